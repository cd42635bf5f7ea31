"""benchmarks/attention_sass.py compiles the decode kernel for sm_90 on a machine without a GPU (Triton's bundled
ptxas / cuobjdump), and the fp8 read path it documents stays what kernels/NOTES.md says: with fp16 dots and V read as
pairs, the key-tile loop converts e4m3 with the packed instruction only (no per-element bf16 conversions), transposes
V with ldmatrix instead of byte loads, and runs fewer instructions in fewer registers than the first fp8 path.

Compiled in a subprocess without TRITON_INTERPRET (the test session interprets the kernels)."""

from __future__ import annotations

from tests.benchmarks.offline_sass import needs_sass_tools, run_compile_script

COMPILE = """
import json
from benchmarks.attention_sass import compile_decode, summarize
out = {}
for name, args in (("first", ("fp8e4nv", "bf16", False)), ("pairs", ("fp8e4nv", "fp16", True))):
    info = summarize(compile_decode(*args, 64, 4, 2))
    out[name] = {"loop": dict(info["loop_detail"]), "total": info["loop_total"], "regs": info["regs"]}
print(json.dumps(out))
"""


@needs_sass_tools
def test_fp8_pairs_loop_has_no_byte_loads_and_fewer_instructions():
    result = run_compile_script(COMPILE)
    first, pairs = result["first"], result["pairs"]
    assert first["loop"].get("F2F.BF16.F16", 0) > 0  # the first path: e4m3 -> f16 -> bf16, one value at a time
    assert first["loop"].get("LDS.U8", 0) > 0  # and V transposed byte by byte
    assert pairs["loop"].get("F2F.BF16.F16", 0) == 0
    assert pairs["loop"].get("LDS.U8", 0) == 0
    assert pairs["loop"].get("LDSM.16.MT88.4", 0) > 0  # V transposed as 16-bit data by ldmatrix
    assert pairs["loop"].get("F2FP.F16.E4M3.UNPACK_B", 0) > 0  # cvt.rn.f16x2.e4m3x2: two values per instruction
    assert pairs["total"] < 0.7 * first["total"]
    assert pairs["regs"] < first["regs"]


SPLIT = """
import json
from benchmarks.attention_sass import compile_decode, programs_per_sm, summarize
out = {}
for name, kwargs in (("whole", {}), ("halves", {"split_v": True, "max_registers": 128})):
    info = summarize(compile_decode("fp8e4nv", "fp16", True, 128, 4, 2, **kwargs))
    out[name] = {"smem": info["smem"], "regs": info["regs"], "programs": programs_per_sm(info["regs"], info["smem"], 4)}
print(json.dumps(out))
"""


@needs_sass_tools
def test_split_v_fits_four_programs_per_sm():
    """``"f16-vsplit"`` at 128 keys / 4 warps / 2 stages with 128 registers: the fp16 V staging tile is half the
    size, so shared memory no longer caps an SM at 3 programs (kernels/NOTES.md)."""
    result = run_compile_script(SPLIT)
    assert result["whole"]["programs"] == 3
    assert result["halves"]["regs"] <= 128
    assert result["halves"]["smem"] < 0.8 * result["whole"]["smem"]
    assert result["halves"]["programs"] == 4


PRE_WAIT = r"""
import json
import re
from benchmarks.attention_sass import _compile, sass_and_resources, summarize
from kernels import decode_attention
pointers = {"out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "counter_ptr": "*i32",
            "order_ptr": "*i32", "q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
            "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32", "slopes_ptr": "*bf16"}
config = decode_attention.SPLIT_DECODE_CONFIG  # Llama-8B at batch 1: 4 query heads a KV head, 32 splits
out = {}
for pre_wait in (False, True):
    constexprs = dict(GROUP=4, BLOCK_H=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, TILE_N=config.tile_n,
                      NUM_SPLITS=32, ORDER=0, FUSED_REDUCE=True, GROUP_PAD=4, SPLITS_PAD=32,
                      SPLIT_CHUNK=decode_attention.MERGE_CHUNK // 4,
                      QUERIES=1, IEEE=False, SOFTCAP=False, ALIBI=False, WINDOW=False, KV_FP8=False,
                      FP8_F16_DOTS=False, V_PAIRS=False, PAIRS_ASM=False, SPLIT_V=False, USE_PDL=True,
                      PRE_WAIT_KV=pre_wait)
    kernel = _compile(decode_attention._decode_kernel, pointers, {"qk_scale", "cap_log2", "v_scale"}, constexprs,
                      config.num_warps, config.num_stages)
    ptx = kernel.asm["ptx"].splitlines()
    wait = next(i for i, line in enumerate(ptx) if "griddepcontrol.wait" in line)
    info = summarize(kernel)
    stack = int(re.search(r"STACK:(\d+)", sass_and_resources(kernel.asm["cubin"])[1]).group(1))
    out[str(pre_wait)] = {"regs": info["regs"], "stack": stack, "tile_n": config.tile_n,
                          "loads_before_wait": sum("ld.global" in line for line in ptx[:wait])}
print(json.dumps(out))
"""


@needs_sass_tools
def test_split_decode_reads_its_first_tile_before_the_pdl_wait():
    """``PRE_WAIT_KV``: the batch-1 split decode loads its lengths, block table and first K and V tiles before
    ``griddepcontrol.wait`` (K and V: ``tile_n`` keys x 256 bytes each over 128 threads, 16 bytes a load), nothing
    without it, and does not spill."""
    result = run_compile_script(PRE_WAIT)
    plain, pre_wait = result["False"], result["True"]
    kv_loads = 2 * pre_wait["tile_n"] * 256 // 16 // 128
    assert plain["loads_before_wait"] == 0, plain
    assert pre_wait["loads_before_wait"] >= kv_loads, pre_wait
    assert pre_wait["stack"] == 0 and pre_wait["regs"] <= 255, pre_wait


EVERY_VARIANT = """
import json
from benchmarks.attention_sass import VARIANTS, compile_decode
compiled = []
for label, cache_ty, dot_ty, v_pairs, split_v in VARIANTS:
    compile_decode(cache_ty, dot_ty, v_pairs, 64, 4, 2, split_v=split_v)
    compiled.append(label)
print(json.dumps({"compiled": compiled, "variants": [variant[0] for variant in VARIANTS]}))
"""


@needs_sass_tools
def test_every_decode_variant_compiles_at_64_keys():
    """V read in two halves compiles at 64 keys as well as 128: the key-tile step takes one branch or the other
    (``attend_kv_tile``), since Triton 3.9 also compiles the statements after a constexpr branch's early return,
    and the fold cannot take V in halves."""
    result = run_compile_script(EVERY_VARIANT)
    assert result["compiled"] == result["variants"]
    assert any("two halves" in label for label in result["compiled"])
