"""The quantized weights' Triton kernels added without a GPU run compile for sm_90 (Triton's bundled ptxas)
without spills, their products on the tensor cores (HMMA, or wgmma's HGMMA): the fused MoE kernels' kinds of
expert weight (16-bit, e4m3 per channel, e4m3 per block, int4 in groups of 128 and of 32 with zero points or
offsets, GGUF blocks, bitsandbytes 4-bit and NVFP4's blocks of 16), the block-scaled fp8 GEMM and the 8-bit
(bitsandbytes, GPTQ) GEMM at their decode and prefill tiles (the 4-bit codebook layers' GEMV:
test_codes_gemv_sass.py)."""

from __future__ import annotations

import pytest

from tests.benchmarks.offline_sass import needs_sass_tools, run_compile_script

COMPILE = """
import json
from benchmarks.attention_sass import _compile, summarize
from kernels import fp8_block_gemm, fused_moe
out = {}


def facts(info):
    ops = info["sass_ops"]
    return [info["regs"], ops.get("STL", 0), ops.get("HMMA", 0) + ops.get("HGMMA", 0)]


def facts_and_loop(info):
    return facts(info) + [info["loop_total"]]


def narrow_global_loads(info):  # the loop's global loads of 4 bytes or less (a gather a weight: one each)
    return sum(n for op, n in info["loop_detail"].items()
               if op.startswith(("LDG.E", "LDGSTS.E")) and not op.endswith((".64", ".128")))


# What the JIT specializes at the models' shapes: N and K divisible by 16 (the weights' loads then vectorize), the
# unit strides as constants
shapes = frozenset({"N", "K"})
common = dict(PAIRS_PER_A_ROW=8, MUL_ROUTING_WEIGHT=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, stride_cn=1)
routing = {"c_ptr": "*bf16", "weights_ptr": "*fp32", "sorted_pair_ids_ptr": "*i32", "block_experts_ptr": "*i32",
           "num_padded_ptr": "*i32"}
kinds = {fused_moe.B_PLAIN: ("*bf16", "*bf16"), fused_moe.B_FP8_CHANNEL: ("*fp8e4nv", "*fp32"),
         fused_moe.B_FP8_BLOCK: ("*fp8e4nv", "*fp32")}
for kind, (b, s) in kinds.items():
    constexprs = dict(common, DOT_PRECISION="tf32", B_KIND=kind, SCALE_N=128 if kind == fused_moe.B_FP8_BLOCK else 0,
                      SCALE_K=128 if kind == fused_moe.B_FP8_BLOCK else 0, stride_ak=1, stride_bk=1)
    pointers = {"a_ptr": "*bf16", "b_ptr": b, "s_ptr": s, **routing}
    info = summarize(_compile(fused_moe._moe_gemm_kernel, pointers, set(), constexprs, 4, 3, divisible_ints=shapes))
    out[f"moe{kind}"] = facts_and_loop(info)
pointers = {"a_ptr": "*bf16", "qh_ptr": "*i16", "s_ptr": "*bf16", "z_ptr": "*bf16", "perm_ptr": "*i32", **routing}
for permuted in (False, True):  # act order: a's columns gathered through the expert's permutation
    constexprs = dict(common, GROUP=128, MAGIC=128.0, USE_ASM=True, PERMUTED=permuted, OFFSETS=False)
    info = summarize(_compile(fused_moe._moe_int4_kernel, pointers, set(), constexprs, 4, 3, divisible_ints=shapes))
    out["moe_int4_act" if permuted else "moe_int4"] = facts_and_loop(info)
for offsets in (False, True):  # groups of 32, four a K step of 128: AWQ / GPTQ's zero points, GGUF's offsets
    constexprs = dict(common, GROUP=32, MAGIC=128.0, USE_ASM=True, PERMUTED=False, OFFSETS=offsets)
    info = summarize(_compile(fused_moe._moe_int4_kernel, pointers, set(), constexprs, 4, 3, divisible_ints=shapes))
    out["moe_int4_g32_offsets" if offsets else "moe_int4_g32"] = facts_and_loop(info)
for group, offsets, scales, permuted in ((16, False, "*fp32", False), (16, False, "*bf16", False),
                                          (32, True, "*fp32", False), (128, False, "*fp32", False),
                                          (128, True, "*fp32", False), (128, True, "*fp32", True)):
    # 8-bit experts: GGUF Q6_K / Q5_K repacked; GPTQ's 128, and its act order (a's columns through a permutation)
    pointers = {"a_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": scales, "o_ptr": scales, "perm_ptr": "*i32", **routing}
    constexprs = dict(common, DOT_PRECISION="tf32", GROUP=group, OFFSETS=offsets, VIA_F32=False, PERMUTED=permuted)
    info = summarize(_compile(fused_moe._moe_int8_kernel, pointers, set(), constexprs, 4, 3, divisible_ints=shapes))
    out[f"moe_int8_g{group}{'_offsets' if offsets else ''}{'_bf16' if scales == '*bf16' else ''}"
        f"{'_act' if permuted else ''}"] = facts_and_loop(info)
from kernels.gguf_gemm import GGUF_KERNEL_TYPES, Q4_K, Q6_K, Q8_0
for ggml_type in (Q8_0, Q4_K, Q6_K):  # GGUF experts kept in their blocks
    block, type_size = GGUF_KERNEL_TYPES[ggml_type]
    pointers = {"a_ptr": "*bf16", "w_ptr": "*u8", **routing}
    constexprs = dict(common, BLOCK_K=64, DOT_PRECISION="tf32", GGML_TYPE=ggml_type, BLOCK=block, TYPE_SIZE=type_size)
    info = summarize(_compile(fused_moe._moe_gguf_kernel, pointers, set(), constexprs, 4, 3, divisible_ints=shapes))
    out[f"moe_gguf{ggml_type}"] = facts_and_loop(info)
pointers = {"a_ptr": "*bf16", "w_ptr": "*u8", "absmax_ptr": "*fp32", "codebook_ptr": "*fp32", **routing}
constexprs = dict(common, BLOCK_K=64, DOT_PRECISION="tf32", BLOCKSIZE=64, ROW_SCALES=False)
info = summarize(_compile(fused_moe._moe_bnb4_kernel, pointers, set(), constexprs, 4, 3, divisible_ints=shapes))
out["moe_bnb4"] = facts_and_loop(info) + [narrow_global_loads(info)]
constexprs = dict(constexprs, BLOCKSIZE=16, ROW_SCALES=True)  # NVFP4 experts: four fp8 block scales a K step of 64
pointers = dict(pointers, absmax_ptr="*fp8e4nv", row_scale_ptr="*fp32")
info = summarize(_compile(fused_moe._moe_bnb4_kernel, pointers, set(), constexprs, 4, 3, divisible_ints=shapes))
out["moe_nvfp4"] = facts_and_loop(info) + [narrow_global_loads(info)]
for m in (1, 512):  # decode: split K (its in-kernel reduction), prefill: whole
    bm, bn = (16, 32) if m <= 16 else (64, 64)
    split = {"partial_ptr": "*fp32", "counter_ptr": "*i32"}
    from kernels import int8_gemm
    for group in (0, 128):  # bitsandbytes 8-bit (a scale per row), GPTQ 8-bit (scales and zero points per group)
        pointers = {"x_ptr": "*bf16", "w_ptr": "*u8" if group else "*i8", "s_ptr": "*fp32", "z_ptr": "*fp32",
                    "out_ptr": "*bf16", **split}
        constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, DOT_PRECISION="tf32", SPLIT=m == 1, GROUP=group,
                          ZEROS=bool(group))
        info = summarize(_compile(int8_gemm._int8_gemm_kernel, pointers, set(), constexprs, 4, 3))
        out[f"int8_{m}" if not group else f"gptq8_{m}"] = facts(info)
    bm, bn, bk = fp8_block_gemm.block_gemm_tiles(m, 128)
    pointers = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "out_ptr": "*bf16", **split}
    constexprs = dict(SCALE_N=128, SCALE_K=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION="tf32",
                      SPLIT=m == 1)
    info = summarize(_compile(fp8_block_gemm._fp8_block_gemm_kernel, pointers, set(), constexprs, 4, 3))
    out[f"block{m}"] = facts(info)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    return run_compile_script(COMPILE)


@needs_sass_tools
def test_quantized_weight_kernels_compile_for_sm90_on_the_tensor_cores_without_spills(compiled):
    result = compiled
    assert set(result) == {"moe0", "moe1", "moe2", "moe_int4", "moe_int4_act", "moe_int4_g32",
                           "moe_int4_g32_offsets", "moe_gguf8", "moe_gguf12", "moe_gguf14", "moe_bnb4",
                           "moe_int8_g16", "moe_int8_g16_bf16", "moe_int8_g32_offsets", "moe_int8_g128",
                           "moe_int8_g128_offsets", "moe_int8_g128_offsets_act", "moe_nvfp4", "block1", "block512",
                           "int8_1", "int8_512", "gptq8_1", "gptq8_512"}
    for name, (regs, spills, mma, *_) in result.items():
        assert 0 < regs <= 255 and spills == 0 and mma > 0, (name, result)


@needs_sass_tools
def test_int4_experts_dequantize_in_few_instructions_a_step(compiled):
    """The int4 experts' K step (decode tile 16 x 64 x 128) within twice the 16-bit experts' instructions: the
    magic-number dequantization, two weights an instruction, straight into the MMA's register operand (the first
    version, a shift, mask, int -> float conversion and FMA per weight and the tile through shared memory, took 530
    against 138, and ran slower than the 16-bit experts for a quarter of their bytes)."""
    assert compiled["moe_int4"][3] <= 2 * compiled["moe0"][3], compiled


@needs_sass_tools
def test_int4_experts_in_groups_of_32_step_within_an_eighth_of_groups_of_128(compiled):
    """Groups of 32 (GGUF Q4_0 / Q4_1 / Q4_K experts repacked at load) in the decode tile's K step of 128: the
    step's four scales and zero points (or offsets) per row loaded as ``[64, 4]`` and repeated over their int16 in
    registers, not reloaded per int16, so the step stays within 1/8 of the one-group step (sm_90, bf16: 249 with zero
    points, 246 with offsets, against 236)."""
    for name in ("moe_int4_g32", "moe_int4_g32_offsets"):
        assert compiled[name][3] <= compiled["moe_int4"][3] * 9 / 8, compiled


@needs_sass_tools
def test_int8_experts_step_near_the_fp8_experts_step(compiled):
    """8-bit experts (decode tile 16 x 64 x 128, bf16): a step within one group (GPTQ's 128, per channel) widens the
    codes and scales the partial product, as many instructions as the e4m3 experts' step (sm_90, Triton 3.6: 296
    against 288 per channel); a step over groups of 16 / 32 (GGUF Q6_K, Q5_K with offsets) computes ``q s + o`` per
    weight with fp32 scales (one FFMA each, exact), within 1.4x the e4m3 per-channel step (391 / 394 against 288;
    bf16 scales 327, two weights an HFMA2, but ``d * sc`` rounded to 8 bits)."""
    fp8 = compiled["moe1"][3]
    assert compiled["moe_int8_g128"][3] <= fp8 * 1.1, compiled
    for name in ("moe_int8_g16", "moe_int8_g32_offsets", "moe_int8_g16_bf16"):
        assert compiled[name][3] <= fp8 * 1.4, compiled
    assert compiled["moe_int8_g16_bf16"][3] < compiled["moe_int8_g16"][3], compiled


@needs_sass_tools
def test_act_order_int8_experts_gather_within_twice_the_step(compiled):
    """GPTQ 8-bit act order: each K step's 128 activation columns gathered through the expert's permutation (a
    permutation load, then 16 scalar loads a thread for the 16 x 128 tile) instead of one contiguous load: within
    twice the in-order step's instructions (sm_90, Triton 3.6: 649 against 353 with offsets; the int4 experts'
    gather, into the MMA's second operand, 301 against 236). Untimed: act-order 8-bit experts are rare, and a decode
    step's weight bytes may still hide it."""
    assert compiled["moe_int8_g128_offsets_act"][3] <= compiled["moe_int8_g128_offsets"][3] * 2, compiled


@needs_sass_tools
def test_codebook_experts_look_up_in_shared_memory(compiled):
    """bitsandbytes NF4 and NVFP4 experts (decode tile 16 x 64 x 64): the 16-entry codebook is looked up with
    ``tl.gather`` (one shared-memory read a weight), not with a global load of ``codebook + code``, which the
    pipeliner turned into a 4-byte cp.async gather a weight (33 a thread a step, 378 instructions; measured 7-12x
    the 16-bit experts' time on the H100). The step keeps its absmax / block-scale loads only, and within 300
    instructions (sm_90: 249 NF4, 289 NVFP4 with Triton 3.9; 246 / 291 with 3.6)."""
    for name in ("moe_bnb4", "moe_nvfp4"):
        loop, gathers = compiled[name][3], compiled[name][4]
        assert gathers <= 2 and loop <= 300, (name, compiled[name])
