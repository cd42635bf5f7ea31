"""Fused MoE: the Triton path (interpreter on CPU) against the per-expert torch loop, in float64, for random routings
and the corner cases (an expert with no token, all tokens on one expert, top-k = number of experts); the align step
and the routing on their own."""

from __future__ import annotations

import pytest
import torch

from kernels.fused_moe import (ExpertQuant, default_config, fused_moe, fused_moe_ref, fused_moe_triton, fused_topk,
                               moe_align_block_size)  # fmt: skip
from tests.kernels.kernel_testing import KERNEL_DEVICE, TOLERANCE, assert_close

SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)


def _problem(tokens, experts, hidden, inter, top_k, dtype, seed, routing="random"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    logits = torch.randn(tokens, experts, generator=gen)
    if routing == "one_expert":  # every token's top choice is expert 2
        logits[:, 2] += 100.0
    elif routing == "skip_expert":  # expert 0 never chosen
        logits[:, 0] = -100.0
    weights, ids = fused_topk(logits, top_k, renormalize=True)
    to = lambda t: t.to(dtype).to(KERNEL_DEVICE)  # noqa: E731
    return to(x), to(w13), to(w2), weights.to(KERNEL_DEVICE), ids.to(KERNEL_DEVICE)


CASES = [
    # tokens, experts, hidden, inter, top_k, routing
    (7, 4, 64, 32, 2, "random"),
    (33, 8, 48, 40, 2, "skip_expert"),  # ragged K and N, an empty expert
    (20, 4, 32, 32, 1, "one_expert"),  # all tokens on one expert
    (9, 4, 32, 48, 4, "random"),  # top-k = number of experts
    (1, 8, 64, 32, 3, "random"),  # decode of one token
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}E{c[1]}H{c[2]}I{c[3]}k{c[4]}-{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_triton_matches_reference(case, dtype):
    tokens, experts, hidden, inter, top_k, routing = case
    x, w13, w2, weights, ids = _problem(tokens, experts, hidden, inter, top_k, dtype, seed=tokens, routing=routing)
    if routing == "skip_expert":
        assert not (ids == 0).any()
    if routing == "one_expert":
        assert (ids[:, 0] == 2).all()
    out = fused_moe_triton(x, w13, w2, weights, ids, config=SMALL)
    assert out.shape == (tokens, hidden) and out.dtype == dtype
    ref = fused_moe_ref(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert_close(out, ref, 4 * TOLERANCE[dtype], "fused_moe")


def _fp8_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert, per-output-channel e4m3 weights and their fp32 scales."""
    scale = w.abs().amax(dim=-1).clamp(min=1e-6) / 448.0
    return (w / scale[..., None]).to(torch.float8_e4m3fn), scale.float()


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"T{c[0]}E{c[1]}H{c[2]}I{c[3]}k{c[4]}-{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_with_fp8_experts_matches_reference(case, dtype):
    """fp8 expert weights (w8a16): the kernel widens each tile and scales the products per expert and channel,
    as the reference does with the same e4m3 values; both near the unquantized experts' result."""
    tokens, experts, hidden, inter, top_k, routing = case
    x, w13, w2, weights, ids = _problem(tokens, experts, hidden, inter, top_k, dtype, seed=tokens, routing=routing)
    (q13, s13), (q2, s2) = _fp8_experts(w13.float()), _fp8_experts(w2.float())
    q13, s13, q2, s2 = (t.to(KERNEL_DEVICE) for t in (q13, s13, q2, s2))
    out = fused_moe_triton(x, q13, q2, weights, ids, config=SMALL, quant=ExpertQuant(s13, s2))
    assert out.shape == (tokens, hidden) and out.dtype == dtype
    ref = fused_moe_ref(x.double(), q13, q2, weights.double(), ids, ExpertQuant(s13.double(), s2.double()))
    assert_close(out, ref, 4 * TOLERANCE[dtype], "fused_moe fp8")
    unquantized = fused_moe_ref(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert (ref - unquantized).abs().max() < 0.1 * unquantized.abs().max()  # e4m3's few percent, not a wrong scale


@pytest.mark.parametrize("block", [(32, 32), (16, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_with_block_scaled_fp8_experts_matches_reference(block, dtype):
    """Experts as block-scaled checkpoints hold them (a scale per ``block`` of each expert's gate|up and down): each
    K step's partial product scaled by its blocks' scales; K steps of the config wider than the block shrink."""
    from kernels.fp8_block_gemm import quantize_fp8_blocks

    x, w13, w2, weights, ids = _problem(21, 4, 128, 64, 2, dtype, seed=5)
    blocks = [[quantize_fp8_blocks(w[e].float().cpu(), block) for e in range(w.shape[0])] for w in (w13, w2)]
    (q13, s13), (q2, s2) = ((torch.stack([q for q, _ in b]), torch.stack([s for _, s in b])) for b in blocks)
    q13, s13, q2, s2 = (t.to(KERNEL_DEVICE) for t in (q13, s13, q2, s2))
    config = dict(SMALL, BLOCK_K=128)  # more than the blocks' K side: stepped down to it
    out = fused_moe_triton(x, q13, q2, weights, ids, config=config, quant=ExpertQuant(s13, s2, block))
    ref = fused_moe_ref(x.double(), q13, q2, weights.double(), ids, ExpertQuant(s13, s2, block))
    assert_close(out, ref, 4 * TOLERANCE[dtype], "fused_moe fp8 blocks")
    unquantized = fused_moe_ref(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert (ref - unquantized).abs().max() < 0.1 * unquantized.abs().max()


def _int4_experts(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[E, N, K]`` weights as int4 experts in the kernel layout: words ``[E, N, K / 8]``, scales and zero points
    ``[E, K / group, N]`` (asymmetric round-to-nearest per group and column)."""
    from kernels.int4_gemm import pack_int4_kernel

    words, scales, zeros = [], [], []
    for w_e in w.float().cpu():
        w_t = w_e.t()  # [K, N]
        grouped = w_t.reshape(-1, group, w_t.shape[1])
        lo, hi = grouped.amin(1).clamp(max=0), grouped.amax(1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-6)
        zero = torch.round(-lo / scale).clamp(0, 15)
        codes = torch.clamp(torch.round(grouped / scale[:, None]) + zero[:, None], 0, 15).reshape(w_t.shape)
        words.append(pack_int4_kernel(codes.long()))
        scales.append(scale)
        zeros.append(zero)
    return torch.stack(words), torch.stack(scales), torch.stack(zeros)


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16: on the GPU (the interpreter's bf16 dot
def test_fused_moe_with_int4_experts_matches_reference(group, dtype):  # is wrong, int4 or not)
    """int4 experts (AWQ / GPTQ after loading): the kernel dequantizes each step's codes by the magic-number
    conversion (each dtype's magic float) in the int4 layout's interleave, reorders a's columns to match and scales
    by the group's scales and zero points, as the reference does."""
    x, w13, w2, weights, ids = _problem(19, 4, 128, 64, 2, dtype, seed=group)
    (q13, s13, z13), (q2, s2, z2) = _int4_experts(w13, group), _int4_experts(w2, group)
    quant = ExpertQuant(s13.to(dtype), s2.to(dtype), None, z13.to(dtype), z2.to(dtype), group, group)
    quant = ExpertQuant(*(t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t for t in quant))
    q13, q2 = q13.to(KERNEL_DEVICE), q2.to(KERNEL_DEVICE)
    out = fused_moe_triton(x, q13, q2, weights, ids, config=dict(SMALL, BLOCK_K=128), quant=quant)
    assert out.shape == (19, 128) and out.dtype == dtype
    ref = fused_moe_ref(x.double(), q13, q2, weights.double(), ids, quant)
    assert_close(out, ref, 4 * TOLERANCE[dtype], "fused_moe int4")
    unquantized = fused_moe_ref(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert (ref - unquantized).abs().max() < 0.2 * unquantized.abs().max()


def _offset_experts(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[E, N, K]`` weights as int4 experts whose zero points are not whole numbers (``z = -min / s`` unrounded,
    GGUF Q4_1's kind): words ``[E, N, K / 8]``, scales, those zero points and their offsets ``o = -z s``
    ``[E, K / group, N]``."""
    from kernels.int4_gemm import pack_int4_kernel

    grouped = w.float().cpu().transpose(1, 2).reshape(w.shape[0], -1, group, w.shape[1])  # [E, K / group, group, N]
    lo, hi = grouped.amin(2), grouped.amax(2)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    zero = -lo / scale
    codes = torch.clamp(torch.round(grouped / scale[:, :, None] + zero[:, :, None]), 0, 15)
    words = torch.stack([pack_int4_kernel(c.reshape(-1, w.shape[1]).long()) for c in codes])
    return words, scale, zero, -zero * scale


@pytest.mark.parametrize("group, block_k", [(32, 64), (32, 128), (64, 128), (128, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_with_int4_offset_experts_matches_reference(group, block_k, dtype):
    """int4 experts with offsets in place of zero points (``W = q s + o``: GGUF Q4_0 / Q4_1 / Q4_K repacked, whose
    zero points ``-o / s`` are not whole numbers), K steps over one or several groups: the kernel adds each group's
    offset in the scaling FMA, as the reference does, which is the weight of the fractional zero points."""
    from kernels.int4_gemm import dequantize_int4

    x, w13, w2, weights, ids = _problem(19, 4, 256, 128, 2, dtype, seed=group + block_k)
    (q13, s13, z13, o13), (q2, s2, z2, o2) = _offset_experts(w13, group), _offset_experts(w2, group)
    assert (z13 != z13.round()).any()
    quant = ExpertQuant(s13.to(dtype), s2.to(dtype), w13_group=group, w2_group=group, w13_offsets=o13.to(dtype),
                        w2_offsets=o2.to(dtype))  # fmt: skip
    quant = ExpertQuant(*(t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t for t in quant))
    q13, q2 = q13.to(KERNEL_DEVICE), q2.to(KERNEL_DEVICE)
    out = fused_moe_triton(x, q13, q2, weights, ids, config=dict(SMALL, BLOCK_K=block_k), quant=quant)
    ref = fused_moe_ref(x.double(), q13, q2, weights.double(), ids, quant)
    assert_close(out, ref, 4 * TOLERANCE[dtype], "fused_moe int4 offsets")
    zero_points = [torch.stack([dequantize_int4(q[e].cpu(), sc[e], z[e], group).t() for e in range(4)]).double()
                   for q, sc, z in ((q13, s13, z13), (q2, s2, z2))]  # fmt: skip
    plain = fused_moe_ref(x.double().cpu(), *zero_points, weights.double().cpu(), ids.cpu())
    assert_close(ref.cpu(), plain, TOLERANCE[dtype], "offsets as fractional zero points")


def test_int4_experts_step_over_whole_groups():
    """The int4 experts' K step: the config's (at most 128, or the group), a power of two, halved until it divides K
    and nests with the group; groups of less than 32 rows are refused."""
    from kernels.fused_moe import _int4_block_k

    assert _int4_block_k(128, 32, 2048) == 128  # four groups a step
    assert _int4_block_k(256, 128, 768) == 128  # one group a step (the 2048-token config's 256)
    assert _int4_block_k(64, 128, 768) == 64  # half a group
    assert _int4_block_k(128, 32, 96) == 32  # K of three 32-row chunks
    assert _int4_block_k(128, 96, 192) == 32  # 32 nests with a group of 96, 64 and 128 do not
    assert _int4_block_k(256, 192, 384) == 64  # a tuned 256 over a group of 192: a power of two, not the group
    with pytest.raises(ValueError, match="groups \\(16\\)"):
        _int4_block_k(128, 16, 256)


def _sorted_by_act_order(w13: torch.Tensor, w2: torch.Tensor, seed: int
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """Each expert's own random act order: its permutations ``[E, K]`` per stack, and the weights with their input
    rows in that order (row ``j`` of expert ``e``'s is input ``perm[e, j]`` of the original)."""
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.stack([torch.randperm(w.shape[2], generator=gen) for _ in range(w.shape[0])]) for w in (w13, w2)]
    return perms, [torch.stack([w[e][:, p[e]] for e in range(w.shape[0])]) for w, p in zip((w13, w2), perms)]


def _assert_act_order_undone(x, weights, ids, ref, dequantized: list[torch.Tensor], perms: list[torch.Tensor],
                             dtype: torch.dtype) -> None:  # fmt: skip
    """The sorted experts' result equals the plain experts' whose weights are the dequantized ones ``[E, N, K]``
    with their input rows put back (the act order undone)."""
    unsorted = []
    for w, p in zip(dequantized, perms):
        plain = torch.empty(w.shape, dtype=torch.float64)
        for e in range(w.shape[0]):
            plain[e][:, p[e]] = w[e].double()
        unsorted.append(plain.to(x.device))
    assert_close(ref, fused_moe_ref(x.double(), *unsorted, weights.double(), ids), TOLERANCE[dtype],
                 "act order undone")


@pytest.mark.parametrize("group, block_k, dtype", [(32, 32, torch.float32), (32, 32, torch.float16),
                                                   (32, 128, torch.float32)])  # fmt: skip
def test_fused_moe_with_act_order_int4_experts_matches_reference(group, block_k, dtype):
    """GPTQ act-order experts: every expert's rows sorted by group with a permutation of its own; the kernel reads
    a's columns through it, as the reference's ``x[:, perm[e]]`` does, and the result is the unpermuted weights'
    (also with K steps over several groups of the sorted rows)."""
    from kernels.int4_gemm import dequantize_int4

    x, w13, w2, weights, ids = _problem(19, 4, 128, 64, 2, dtype, seed=7)
    perms, sorted_weights = _sorted_by_act_order(w13, w2, seed=8)
    (q13, s13, z13), (q2, s2, z2) = (_int4_experts(w, group) for w in sorted_weights)
    quant = ExpertQuant(s13.to(dtype), s2.to(dtype), None, z13.to(dtype), z2.to(dtype), group, group,
                        *(p.to(torch.int32) for p in perms))  # fmt: skip
    quant = ExpertQuant(*(t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t for t in quant))
    q13, q2 = q13.to(KERNEL_DEVICE), q2.to(KERNEL_DEVICE)
    out = fused_moe_triton(x, q13, q2, weights, ids, config=dict(SMALL, BLOCK_K=block_k), quant=quant)
    ref = fused_moe_ref(x.double(), q13, q2, weights.double(), ids, quant)
    assert_close(out, ref, 4 * TOLERANCE[dtype], "fused_moe act-order int4")
    dequantized = [torch.stack([dequantize_int4(q[e].cpu(), sc[e].double(), z[e].double(), group).t()
                                for e in range(4)]) for q, sc, z in ((q13, s13, z13), (q2, s2, z2))]  # fmt: skip
    _assert_act_order_undone(x, weights, ids, ref, dequantized, perms, dtype)


@pytest.mark.parametrize("w13_type, w2_type", [("Q8_0", "Q4_0"), ("Q4_K", "Q6_K"), ("Q5_K", "Q4_1")])
def test_fused_moe_with_gguf_experts_matches_reference(w13_type, w2_type):
    """GGUF experts kept in their blocks (llama.cpp's stacked ``ffn_*_exps``; Q4_K_M files mix Q4_K and Q6_K): the
    kernel decodes each tile from the file's bytes as the dense block GEMM does, as the reference's dequantization
    does."""
    import gguf

    from core.layers.quantization.gguf import _random_blocks
    from kernels.gguf_gemm import GGUF_KERNEL_TYPES

    x, w13, w2, weights, ids = _problem(19, 4, 256, 256, 2, torch.float32, seed=11)
    types = [int(gguf.GGMLQuantizationType[name]) for name in (w13_type, w2_type)]
    gen = torch.Generator().manual_seed(12)
    raw = []
    for w, ggml_type in zip((w13, w2), types):  # random blocks with sane scales (gguf-py cannot write K-quants)
        block, type_size = GGUF_KERNEL_TYPES[ggml_type]
        blocks = torch.empty(w.shape[0], w.shape[1], w.shape[2] // block * type_size, dtype=torch.uint8)
        _random_blocks(ggml_type)(blocks, gen)
        raw.append(blocks.to(KERNEL_DEVICE))
    quant = ExpertQuant(w13_ggml=types[0], w2_ggml=types[1])
    out = fused_moe_triton(x, *raw, weights, ids, config=SMALL, quant=quant)
    ref = fused_moe_ref(x.double(), *raw, weights.double(), ids, quant)
    assert ref.abs().max() > 0
    assert_close(out, ref, 4 * TOLERANCE[torch.float32], f"fused_moe gguf {w13_type}/{w2_type}")


def _gguf_stack(w: torch.Tensor, ggml_type: int, gen: torch.Generator) -> torch.Tensor:
    """Random blocks of ``ggml_type`` (sane scales) shaped as ``w``'s experts: ``[E, N, row_bytes]``."""
    from core.layers.quantization.gguf import _random_blocks
    from kernels.gguf_gemm import GGUF_KERNEL_TYPES

    block, type_size = GGUF_KERNEL_TYPES[ggml_type]
    blocks = torch.empty(w.shape[0], w.shape[1], w.shape[2] // block * type_size, dtype=torch.uint8)
    _random_blocks(ggml_type)(blocks, gen)
    return blocks


@pytest.mark.parametrize("w13_type, w2_type", [("Q4_K", "Q6_K"), ("Q4_0", "Q4_K"), ("Q8_0", "Q4_1")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_with_gguf_experts_repacked_to_int4_matches_their_blocks(w13_type, w2_type, dtype):
    """GGUF Q4_0 / Q4_1 / Q4_K expert stacks repacked for the int4 experts' kernel (``experts_as_int4``: codes,
    scales and offsets, group 32), each stack on its own beside the other kept in its blocks (a Q4_K_M file's Q4_K
    gate / up and Q6_K down): the kernels compute what the file's blocks do."""
    import gguf

    from core.layers.quantization.gguf import experts_as_int4
    from kernels.gguf_gemm import INT4_TYPES

    x, w13, w2, weights, ids = _problem(19, 4, 256, 256, 2, dtype, seed=17)
    types = [int(gguf.GGMLQuantizationType[name]) for name in (w13_type, w2_type)]
    gen = torch.Generator().manual_seed(18)
    raw = [_gguf_stack(w, t, gen) for w, t in zip((w13, w2), types)]
    stacks, fields = [], {}
    for name, blocks, t, k in (("w13", raw[0], types[0], 256), ("w2", raw[1], types[1], 256)):
        if t in INT4_TYPES:
            words, scales, offsets = experts_as_int4(blocks, t, k, dtype)
            stacks.append(words.to(KERNEL_DEVICE))
            fields.update({f"{name}_scale": scales.to(KERNEL_DEVICE), f"{name}_offsets": offsets.to(KERNEL_DEVICE),
                           f"{name}_group": 32})
        else:
            stacks.append(blocks.to(KERNEL_DEVICE))
            fields[f"{name}_ggml"] = t
    quant = ExpertQuant(**fields)
    assert quant.int4 and (quant.ggml_type(0) == 0) == (types[0] in INT4_TYPES)
    out = fused_moe_triton(x, *stacks, weights, ids, config=dict(SMALL, BLOCK_K=128), quant=quant)
    blocks_quant = ExpertQuant(w13_ggml=types[0], w2_ggml=types[1])
    ref = fused_moe_ref(x.double(), *(r.to(KERNEL_DEVICE) for r in raw), weights.double(), ids, blocks_quant)
    assert ref.abs().max() > 0
    assert_close(out, ref, 4 * TOLERANCE[dtype], f"fused_moe gguf {w13_type}/{w2_type} as int4")


@pytest.mark.parametrize("w13_type, w2_type", [("Q4_K", "Q6_K"), ("Q8_0", "Q5_K"), ("Q6_K", "Q4_0")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_with_gguf_experts_repacked_to_int8_matches_their_blocks(w13_type, w2_type, dtype):
    """GGUF Q8_0 / Q6_K / Q5_K expert stacks repacked for the 8-bit experts' kernel (``experts_as_int8``: int8
    codes, fp32 scales per 32 / 16 inputs, Q5_K's offsets), beside a Q4 stack on the int4 experts' kernel (a Q4_K_M
    file's Q4_K gate / up and Q6_K down): the kernels compute what the file's blocks do."""
    import gguf

    from core.layers.quantization.gguf import experts_as_int4, experts_as_int8
    from kernels.gguf_gemm import INT4_TYPES, INT8_GROUPS

    x, w13, w2, weights, ids = _problem(19, 4, 256, 256, 2, dtype, seed=23)
    types = [int(gguf.GGMLQuantizationType[name]) for name in (w13_type, w2_type)]
    gen = torch.Generator().manual_seed(24)
    raw = [_gguf_stack(w, t, gen) for w, t in zip((w13, w2), types)]
    stacks, fields = [], {}
    for name, blocks, t in (("w13", raw[0], types[0]), ("w2", raw[1], types[1])):
        if t in INT4_TYPES:
            words, scales, offsets = experts_as_int4(blocks, t, 256, dtype)
            fields[f"{name}_group"] = 32
        else:
            words, scales, offsets = experts_as_int8(blocks, t, 256)
            fields.update({f"{name}_group": INT8_GROUPS[t], f"{name}_int8": True})
        stacks.append(words.to(KERNEL_DEVICE))
        fields.update({f"{name}_scale": scales.to(KERNEL_DEVICE),
                       f"{name}_offsets": None if offsets is None else offsets.to(KERNEL_DEVICE)})
    quant = ExpertQuant(**fields)
    assert not quant.gguf and quant.int4 == any(t in INT4_TYPES for t in types)
    out = fused_moe_triton(x, *stacks, weights, ids, config=dict(SMALL, BLOCK_K=128), quant=quant)
    blocks_quant = ExpertQuant(w13_ggml=types[0], w2_ggml=types[1])
    ref = fused_moe_ref(x.double(), *(r.to(KERNEL_DEVICE) for r in raw), weights.double(), ids, blocks_quant)
    assert ref.abs().max() > 0
    assert_close(out, ref, 4 * TOLERANCE[dtype], f"fused_moe gguf {w13_type}/{w2_type} as int8")


def _int8_experts(w: torch.Tensor, group: int, offsets: bool, scale_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """8-bit experts of ``w [E, N, K]``: symmetric int8 codes (``offsets``: uint8 codes with ``W = q s + o``), scales
    (and offsets) ``[E, K / group, N]`` in ``scale_dtype``."""
    grouped = w.float().cpu().transpose(1, 2).reshape(w.shape[0], -1, group, w.shape[1])  # [E, K / group, group, N]
    if offsets:
        lo, hi = grouped.amin(2), grouped.amax(2)
        scale = ((hi - lo) / 255).clamp(min=1e-6)
        codes = torch.clamp(torch.round((grouped - lo[:, :, None]) / scale[:, :, None]), 0, 255).to(torch.uint8)
        extra = lo.to(scale_dtype)
    else:
        scale = (grouped.abs().amax(2) / 127).clamp(min=1e-6)
        codes = torch.clamp(torch.round(grouped / scale[:, :, None]), -127, 127).to(torch.int8)
        extra = None
    codes = codes.reshape(w.shape[0], -1, w.shape[1]).transpose(1, 2).contiguous()  # [E, N, K]
    return codes, scale.to(scale_dtype), extra


@pytest.mark.parametrize("group, block_k, offsets", [(16, 64, False), (32, 128, True), (64, 32, True),
                                                     (0, 128, False), (0, 64, True)])  # fmt: skip
@pytest.mark.parametrize("dtype, scale_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                (torch.float16, torch.float16)]
                         + ([(torch.bfloat16, torch.bfloat16)] if KERNEL_DEVICE == "cuda" else []))  # fmt: skip
def test_fused_moe_with_int8_experts_matches_reference(group, block_k, offsets, dtype, scale_dtype):
    """8-bit experts (``W = q s (+ o)``, codes ``[E, N, K]``): groups of 16 / 32 (GGUF Q6_K, Q8_0 / Q5_K: the
    weights scaled before the dot), groups of a step or more and per channel (group 0 here: K; the step's partial
    product scaled, offsets through a's row sums), with and without offsets, as the reference's dequantization."""
    x, w13, w2, weights, ids = _problem(19, 4, 256, 128, 2, dtype, seed=group + block_k)
    (q13, s13, o13), (q2, s2, o2) = (_int8_experts(w, group or w.shape[2], offsets, scale_dtype) for w in (w13, w2))
    quant = ExpertQuant(s13, s2, w13_group=group or 256, w2_group=group or 128, w13_offsets=o13, w2_offsets=o2,
                        w13_int8=True, w2_int8=True)  # fmt: skip
    quant = ExpertQuant(*(t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t for t in quant))
    assert not quant.int4 and not quant.gguf
    q13, q2 = q13.to(KERNEL_DEVICE), q2.to(KERNEL_DEVICE)
    out = fused_moe_triton(x, q13, q2, weights, ids, config=dict(SMALL, BLOCK_K=block_k), quant=quant)
    ref = fused_moe_ref(x.double(), q13, q2, weights.double(), ids, quant)
    assert ref.abs().max() > 0
    assert_close(out, ref, 4 * TOLERANCE[dtype], "fused_moe int8")
    unquantized = fused_moe_ref(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert_close(ref, unquantized, 0.05, "int8 experts near their weights")


@pytest.mark.parametrize("group, block_k, offsets", [(32, 32, True), (64, 32, False), (32, 128, True)])
def test_fused_moe_with_act_order_int8_experts_matches_reference(group, block_k, offsets):
    """GPTQ 8-bit act-order experts: every expert's rows sorted by group with a permutation of its own; the 8-bit
    kernel reads a's columns through it (steps within one group: offsets through the permuted row sums; steps over
    several), as the reference's ``x[:, perm[e]]`` does, and the result is the unpermuted weights'."""
    from kernels.fused_moe import dequantize_int8_experts

    dtype = torch.float32
    x, w13, w2, weights, ids = _problem(19, 4, 128, 64, 2, dtype, seed=9)
    perms, sorted_weights = _sorted_by_act_order(w13, w2, seed=10)
    (q13, s13, o13), (q2, s2, o2) = (_int8_experts(w, group, offsets, torch.float32) for w in sorted_weights)
    quant = ExpertQuant(s13, s2, w13_group=group, w2_group=group, w13_offsets=o13, w2_offsets=o2, w13_int8=True,
                        w2_int8=True, w13_perm=perms[0].to(torch.int32), w2_perm=perms[1].to(torch.int32))
    quant = ExpertQuant(*(t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t for t in quant))
    q13, q2 = q13.to(KERNEL_DEVICE), q2.to(KERNEL_DEVICE)
    out = fused_moe_triton(x, q13, q2, weights, ids, config=dict(SMALL, BLOCK_K=block_k), quant=quant)
    ref = fused_moe_ref(x.double(), q13, q2, weights.double(), ids, quant)
    assert_close(out, ref, 4 * TOLERANCE[dtype], "fused_moe act-order int8")
    dequantized = [torch.stack([dequantize_int8_experts(q[e].cpu(), sc[e].cpu(), None if o is None else o[e].cpu(),
                                                        group) for e in range(4)])
                   for q, sc, o in ((q13, s13, o13), (q2, s2, o2))]  # fmt: skip
    _assert_act_order_undone(x, weights, ids, ref, dequantized, perms, dtype)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_fused_moe_with_regrouped_act_order_down_matches_reference(kind):
    """A tensor-parallel rank's act-order down projection: each expert's input rows fall unevenly into the groups
    and are regrouped into padded groups of 32 (``Int4MoEMethod.regroup_experts``: K' > the activations' columns,
    padding rows weighing 0 and reading column 0); the kernel reads a's columns through each expert's permutation,
    as the reference does, and the product is that of the expert's weights before regrouping."""
    from core.layers.quantization.int4 import Int4MoEMethod
    from kernels.fused_moe import dequantize_int8_experts
    from kernels.int4_gemm import pack_int4_kernel

    experts, hidden, inter, groups = 4, 64, 64, 4
    x, w13, w2, weights, ids = _problem(19, experts, hidden, inter, 2, torch.float32, seed=11)
    g_idx = torch.randint(0, groups, (experts, inter), generator=torch.Generator().manual_seed(12))
    bits_max, zero = (15, 8) if kind == "int4" else (255, 128)
    # every group's symmetric scales per column: codes q [inter, E * hidden], zero points / scales [groups, E * hidden]
    w2_t = w2.cpu().transpose(1, 2)  # [E, inter, hidden]
    scales = torch.stack([torch.stack([w2_t[e][g_idx[e] == g].abs().amax(0) if (g_idx[e] == g).any()
                                       else torch.ones(hidden) for g in range(groups)]) for e in range(experts)])
    scales = (scales / (bits_max - zero)).clamp(min=1e-6)  # [E, groups, hidden]
    codes = torch.stack([torch.clamp(torch.round(w2_t[e] / scales[e][g_idx[e]]) + zero, 0, bits_max)
                         for e in range(experts)]).long()  # [E, inter, hidden]
    plain_w2 = torch.stack([((codes[e] - zero) * scales[e][g_idx[e]]).t() for e in range(experts)]).double()
    q = codes.transpose(0, 1).reshape(inter, experts * hidden)
    zeros = torch.full((groups, experts * hidden), zero, dtype=torch.long)
    flat_scales = scales.transpose(0, 1).reshape(groups, experts * hidden)
    new_q, new_z, new_s, perms = Int4MoEMethod.regroup_experts(q, zeros, flat_scales, g_idx, hidden)
    total = new_q.shape[0]
    assert total > inter and total % 32 == 0
    per_expert = lambda t: t.reshape(-1, experts, hidden).transpose(0, 1).contiguous()  # noqa: E731
    s2, z2 = per_expert(new_s), per_expert(new_z)
    if kind == "int4":
        q13, s13, z13 = _int4_experts(w13, 32)
        q2 = torch.stack([pack_int4_kernel(new_q[:, e * hidden: (e + 1) * hidden]) for e in range(experts)])
        quant = ExpertQuant(s13, s2.float(), None, z13, z2.float(), 32, 32, None, perms)
    else:
        q13, s13, o13 = _int8_experts(w13, 32, True, torch.float32)
        q2 = torch.stack([new_q[:, e * hidden: (e + 1) * hidden].t().to(torch.uint8) for e in range(experts)])
        quant = ExpertQuant(s13, s2.float(), w13_group=32, w2_group=32, w13_offsets=o13, w2_offsets=-z2 * s2.float(),
                            w13_int8=True, w2_int8=True, w2_perm=perms)
    quant = ExpertQuant(*(t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t for t in quant))
    q13, q2 = q13.to(KERNEL_DEVICE), q2.to(KERNEL_DEVICE)
    out = fused_moe_triton(x, q13, q2, weights, ids, config=SMALL, quant=quant)
    ref = fused_moe_ref(x.double(), q13, q2, weights.double(), ids, quant)
    assert_close(out, ref, 4 * TOLERANCE[torch.float32], f"fused_moe regrouped {kind} down")
    if kind == "int4":
        from kernels.int4_gemm import dequantize_int4

        plain_w13 = torch.stack([dequantize_int4(q13[e].cpu(), s13[e], z13[e], 32).t() for e in range(experts)])
    else:
        plain_w13 = torch.stack([dequantize_int8_experts(q13[e].cpu(), s13[e], o13[e], 32) for e in range(experts)])
    plain = fused_moe_ref(x.double(), plain_w13.double().to(x.device), plain_w2.to(x.device), weights.double(), ids)
    assert_close(ref, plain, 1e-5, "regrouping undone")


def test_int8_experts_step_within_or_over_whole_groups():
    """The 8-bit experts' K step: the config's (16..128), halved until it divides K and nests with the group."""
    from kernels.fused_moe import _int8_block_k

    assert _int8_block_k(128, 16, 2048) == 128  # eight Q6_K groups a step
    assert _int8_block_k(64, 768, 768) == 64  # per channel
    assert _int8_block_k(128, 768, 768) == 128
    assert _int8_block_k(128, 48, 96) == 16  # 16 nests with a group of 48, 32 and 64 do not
    with pytest.raises(ValueError, match="groups \\(8\\)"):
        _int8_block_k(128, 8, 256)


def test_codebook_experts_step_64_codes_where_it_divides_k_and_nests_with_the_block():
    from kernels.fused_moe import _bnb4_block_k

    assert _bnb4_block_k(16, 2048) == 64  # NVFP4: four blocks a step
    assert _bnb4_block_k(64, 768) == 64  # NF4: one block a step
    assert _bnb4_block_k(256, 2048) == 64  # a quarter of a block
    assert _bnb4_block_k(16, 96) == 32  # 64 does not divide K
    with pytest.raises(ValueError, match="blocks of 48"):
        _bnb4_block_k(48, 96)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["nf4", "nvfp4"])
def test_fused_moe_with_bitsandbytes_experts_matches_reference(dtype, kind):
    """bitsandbytes NF4 experts (two codes a byte, an absmax per 64 weights) and NVFP4's form of them (e2m1 codes, a
    scale per 16 weights: several blocks a K step): the kernel looks each code up and scales it, as the
    reference's dequantization does, and stays near the unquantized experts."""
    from kernels.bnb4_gemm import E2M1_CODEBOOK, NF4_CODEBOOK, quantize_bnb4

    codebook, block, top = (NF4_CODEBOOK, 64, 1.0) if kind == "nf4" else (E2M1_CODEBOOK, 16, 6.0)
    x, w13, w2, weights, ids = _problem(19, 4, 128, 64, 2, dtype, seed=13)
    unit = tuple(v / top for v in codebook)  # quantized against values in [-1, 1], scaled back by the absmax / top
    packed = [[quantize_bnb4(w[e].float().cpu(), block, unit) for e in range(w.shape[0])] for w in (w13, w2)]
    (q13, a13), (q2, a2) = ((torch.stack([c for c, _ in p]).to(KERNEL_DEVICE),
                             torch.stack([m / top for _, m in p]).to(KERNEL_DEVICE)) for p in packed)  # fmt: skip
    rows = {}
    if kind == "nvfp4":  # fp8 block scales, each row's global scale applied to the product
        rows = {f"w{i}_row_scale": (a.amax(-1) / 448).clamp(min=1e-8) for i, a in (("13", a13), ("2", a2))}
        a13, a2 = ((a / r[..., None]).to(torch.float8_e4m3fn) for a, r in ((a13, rows["w13_row_scale"]),
                                                                             (a2, rows["w2_row_scale"])))
    quant = ExpertQuant(a13, a2, codebook=torch.tensor(codebook, device=KERNEL_DEVICE), bnb_block=block, **rows)
    out = fused_moe_triton(x, q13, q2, weights, ids, config=SMALL, quant=quant)
    ref = fused_moe_ref(x.double(), q13, q2, weights.double(), ids, quant)
    assert_close(out, ref, 4 * TOLERANCE[dtype], "fused_moe bnb4")
    unquantized = fused_moe_ref(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert (ref - unquantized).abs().max() < 0.3 * unquantized.abs().max()


def test_fused_moe_default_config_matches_reference():
    x, w13, w2, weights, ids = _problem(70, 8, 64, 64, 2, torch.float32, seed=1)
    out = fused_moe_triton(x, w13, w2, weights, ids, config=default_config(70, 8))
    assert_close(out, fused_moe_ref(x.double(), w13.double(), w2.double(), weights.double(), ids), 1e-4, "fused_moe")


def test_align_block_size_sorts_and_pads_per_expert():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2]], dtype=torch.int32)  # expert 3 gets 3 pairs, 0 gets 2
    sorted_ids, block_experts, num_padded = moe_align_block_size(ids, num_experts=5, block_m=4)
    pairs = ids.numel()
    assert sorted_ids.shape == (pairs + 5 * 3,)
    assert int(num_padded) == 4 * 4  # experts 0, 1, 2, 3 each one padded block; 4 none
    flat = ids.flatten()
    for block in range(4):
        run = sorted_ids[block * 4 : (block + 1) * 4]
        real = run[run < pairs]
        assert (flat[real.long()] == block_experts[block]).all()
        assert real.tolist() == sorted(real.tolist())  # stable: token order kept within an expert
    assert block_experts[:4].tolist() == [0, 1, 2, 3]
    assert sorted(sorted_ids[sorted_ids < pairs].tolist()) == list(range(pairs))  # every pair exactly once
    assert (sorted_ids[16:] == pairs).all()


def test_topk_renormalisation_matches_softmax_of_topk_logits():
    """Mixtral's softmax over the top-k logits = softmax over all, top-k, renormalised."""
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    weights, ids = fused_topk(logits, 2, renormalize=True)
    expected = torch.softmax(logits.gather(1, ids.long()), dim=-1)
    torch.testing.assert_close(weights, expected)
    raw, _ = fused_topk(logits, 2, renormalize=False)
    torch.testing.assert_close(raw, torch.softmax(logits, -1).gather(1, ids.long()))


def test_dispatcher_on_cpu_takes_reference():
    x, w13, w2, _, _ = _problem(5, 4, 32, 16, 2, torch.float32, seed=3)
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    weights, ids = fused_topk(logits, 2, True)
    out = fused_moe(x.cpu(), w13.cpu(), w2.cpu(), logits, 2, True)
    torch.testing.assert_close(out, fused_moe_ref(x.cpu(), w13.cpu(), w2.cpu(), weights, ids))


def _qwen3_30b_experts(kind: str, gen: torch.Generator):
    """Qwen3-30B-A3B's 128 experts (hidden 2048, width 768) on the GPU: bf16, e4m3 per channel, or int4 in groups of
    128 (its GPTQ-Int4 release's); (w13, w2, ExpertQuant or None)."""
    experts, hidden, inter = 128, 2048, 768
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    if kind == "bf16":
        return w13.to(torch.bfloat16).cuda(), w2.to(torch.bfloat16).cuda(), None
    if kind == "fp8":
        (q13, s13), (q2, s2) = _fp8_experts(w13), _fp8_experts(w2)
        return q13.cuda(), q2.cuda(), ExpertQuant(s13.cuda(), s2.cuda())
    (q13, s13, z13), (q2, s2, z2) = _int4_experts(w13, 128), _int4_experts(w2, 128)
    scales, zeros = (t.to(torch.bfloat16).cuda() for t in (s13, s2)), (t.to(torch.bfloat16).cuda() for t in (z13, z2))
    perms = [None, None]
    if kind == "int4-act":  # each expert's own input order (the rows above then count as sorted by it)
        perms = [torch.stack([torch.randperm(k, generator=gen) for _ in range(experts)]).to(torch.int32).cuda()
                 for k in (hidden, inter)]  # fmt: skip
    return q13.cuda(), q2.cuda(), ExpertQuant(*scales, None, *zeros, 128, 128, *perms)


@pytest.mark.gpu
@pytest.mark.parametrize("kind, tokens", [("bf16", 64), ("bf16", 256), ("bf16", 8192), ("fp8", 1), ("fp8", 64),
                                          ("fp8", 2048), ("int4", 1), ("int4", 64), ("int4", 2048),
                                          ("int4-act", 64), ("int4-act", 2048)])
def test_gpu_fused_moe_at_the_qwen3_30b_shape(kind, tokens):
    """The real shape in bf16, its experts 16-bit, w8a16 or w4a16 (act order: through a permutation per expert; the
    default configs: decode's small row blocks, prefill's larger ones), against the reference on the same
    weights."""
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 2048, generator=gen).to(torch.bfloat16).cuda()
    w13, w2, quant = _qwen3_30b_experts(kind, gen)
    weights, ids = fused_topk(torch.randn(tokens, 128, generator=gen).cuda(), 8, True)
    out = fused_moe_triton(x, w13, w2, weights, ids, quant=quant)
    ref_w13, ref_w2 = (w13.double(), w2.double()) if quant is None else (w13, w2)
    ref = fused_moe_ref(x.double(), ref_w13, ref_w2, weights.double(), ids, quant)
    assert_close(out, ref, TOLERANCE[torch.bfloat16], f"fused_moe {kind}")


@pytest.mark.gpu
def test_gpu_fused_moe_cuda_graph_replays_new_routing():
    """Captured once, replayed with other inputs and routings: no host sync inside, same answers as eager."""
    gen = torch.Generator().manual_seed(0)
    tokens, experts, hidden, inter, top_k = 64, 8, 256, 128, 2
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / 16).to(torch.bfloat16).cuda()
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / 12).to(torch.bfloat16).cuda()
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16).cuda()
    logits = torch.randn(tokens, experts, generator=gen).cuda()
    fused_moe(x, w13, w2, logits, top_k, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, logits, top_k, True)
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        x.copy_(torch.randn(tokens, hidden, generator=g).to(torch.bfloat16))
        logits.copy_(torch.randn(tokens, experts, generator=g))
        graph.replay()
        torch.testing.assert_close(out, fused_moe(x, w13, w2, logits, top_k, True))


def test_config_table_nearest_token_count(monkeypatch, tmp_path):
    """Tuned entries (tune_fused_moe.py's JSON) win over the defaults, at the nearest tuned token count."""
    import json

    import kernels.fused_moe as fm

    table = {"configs": {fm.shape_key(8, 64, 32, torch.float16): {"16": dict(SMALL, BLOCK_M=32), "1024": SMALL}}}
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(fm, "CONFIG_FILE", path)
    fm._tuned_table.cache_clear()
    try:
        assert fm.get_config(20, 8, 64, 32, torch.float16)["BLOCK_M"] == 32
        assert fm.get_config(900, 8, 64, 32, torch.float16) == SMALL
        assert fm.get_config(20, 8, 64, 32, torch.float32) == default_config(20, 8)  # untuned shape
    finally:
        fm._tuned_table.cache_clear()
