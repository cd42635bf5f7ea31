"""GGUF block GEMM: the torch dequantizer against the ``gguf`` package's, the Triton kernel (interpreter on CPU)
against the dequantize-then-matmul reference, for every type kept quantized, both launch shapes (decode M <= 16 and
the ``tl.dot`` path), ragged N and several K (one and several blocks per tile)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from kernels.gguf_gemm import (
    GGUF_KERNEL_TYPES, Q4_K, Q5_K, Q6_K, dequantize_gguf, gguf_gemm, gguf_linear_ref, q4_blocks_as_int4,
)
from kernels.gguf_gemm import _k_scale_min
from kernels.int4_gemm import int4_gemm, int4_linear, int4_linear_ref, pack_int4_kernel
from tests.kernels.kernel_testing import KERNEL_DEVICE

TYPES = sorted(GGUF_KERNEL_TYPES)
TYPE_IDS = [GGMLQuantizationType(t).name for t in TYPES]


def random_blocks(ggml_type: int, n: int, k: int, seed: int, scale: float = 0.01) -> np.ndarray:
    """Random bytes in the type's block layout, with the float16 scales overwritten by finite small values."""
    rng = np.random.default_rng(seed)
    block, type_size = GGUF_KERNEL_TYPES[ggml_type]
    raw = rng.integers(0, 256, (n, k // block * type_size), dtype=np.uint8)
    blocks = raw.reshape(n, k // block, type_size)
    f16_at = {Q6_K: [208]}.get(ggml_type, [0] if ggml_type in (2, 8) else [0, 2])
    for at in f16_at:
        values = rng.uniform(-scale, scale, blocks.shape[:2]).astype(np.float16)
        blocks[..., at : at + 2] = values.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return raw


def quantize_q4_k(array: np.ndarray) -> np.ndarray:
    """``[..., K]`` floats (K a multiple of 256) as Q4_K blocks ``uint8 [..., K / 256 * 144]`` (gguf-py writes no
    K-quants): each 32-weight sub-block's range ``[min(x, 0), max(x)]`` in 16 steps as ggml keeps it (``min <= 0``),
    its scale and ``-min`` as 6-bit multiples of the super-block's fp16 ``d`` / ``dmin``, all rounded to nearest
    (ggml searches them; the layout is the same)."""
    shape = array.shape
    x = array.astype(np.float32).reshape(-1, 8, 32)
    lo = np.minimum(x.min(-1), 0.0)
    scale, mins = (x.max(-1) - lo) / 15, -lo
    d, dmin = (scale.max(-1) / 63).astype(np.float16), (mins.max(-1) / 63).astype(np.float16)

    def six_bits(values: np.ndarray, unit: np.ndarray) -> np.ndarray:
        unit = unit.astype(np.float32)[:, None]
        return np.clip(np.rint(values / np.where(unit == 0, 1, unit)), 0, 63).astype(np.uint8)

    sc, m = six_bits(scale, d), six_bits(mins, dmin)
    step = d.astype(np.float32)[:, None] * sc
    shifted = x + (dmin.astype(np.float32)[:, None] * m)[..., None]
    q = np.clip(np.rint(shifted / np.where(step == 0, 1, step)[..., None]), 0, 15).astype(np.uint8)
    out = np.zeros((x.shape[0], 144), np.uint8)
    out[:, 0:2], out[:, 2:4] = d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2)
    out[:, 4:8] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    out[:, 16:] = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # chunk c: sub-blocks 2c (low), 2c + 1 (high)
    return out.reshape(*shape[:-1], shape[-1] // 256 * 144)


def quantize_q6_k(array: np.ndarray) -> np.ndarray:
    """``[..., K]`` floats (K a multiple of 256) as Q6_K blocks ``uint8 [..., K / 256 * 210]`` (gguf-py writes no
    K-quants): each 16-weight sub-block's signed range in 6-bit codes ``q6 - 32``, its scale an int8 multiple of the
    super-block's fp16 ``d``, rounded to nearest (ggml searches them), in ggml's layout (``_element_maps``)."""
    from kernels.gguf_gemm import Q6_K, _element_maps

    shape = array.shape
    x = array.astype(np.float32).reshape(-1, 16, 16)
    scale = np.abs(x).max(-1) / 31
    d = (scale.max(-1) / 127).astype(np.float16)
    unit = d.astype(np.float32)[:, None]
    sc = np.clip(np.rint(scale / np.where(unit == 0, 1, unit)), -128, 127).astype(np.int8)
    step = (unit * sc)[..., None]
    q = (np.clip(np.rint(x / np.where(step == 0, 1, step)), -32, 31) + 32).astype(np.uint8).reshape(-1, 256)
    maps = {k: np.array(v) for k, v in _element_maps(Q6_K).items()}
    out = np.zeros((q.shape[0], 210), np.uint8)
    for shift in (0, 4):  # each shift's elements own distinct bytes
        at = maps["q_shift"] == shift
        out[:, maps["q_byte"][at]] |= (q[:, at] & 0xF) << shift
    for shift in (0, 2, 4, 6):
        at = maps["qh_shift"] == shift
        out[:, maps["qh_byte"][at]] |= (q[:, at] >> 4) << shift
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.view(np.uint8).reshape(-1, 2)
    return out.reshape(*shape[:-1], shape[-1] // 256 * 210)


def test_q6_k_writer_round_trips_through_the_dequantizer():
    x = np.random.default_rng(1).standard_normal((6, 512)).astype(np.float32)
    raw = torch.from_numpy(quantize_q6_k(x))
    back = dequantize_gguf(raw, 14, 512).numpy()
    assert np.abs(back - x).max() < 0.05 * np.abs(x).max()


def test_q8_0_q6_k_q5_k_blocks_as_int8_codes_equal_the_dequantized_file():
    """``blocks_as_int8`` (the 8-bit experts' form of Q8_0 / Q6_K / Q5_K): ``q * s + o`` with fp32 scales and offsets
    is ``dequantize_gguf``'s fp32 weight bit for bit (so rounding it to the activations' dtype is the dequantized
    file's rounding); codes within int8, groups of 32 / 16 / 32."""
    from core.layers.quantization.gguf import _random_blocks
    from kernels.fused_moe import dequantize_int8_experts
    from kernels.gguf_gemm import INT8_GROUPS, INT8_TYPES, blocks_as_int8

    gen = torch.Generator().manual_seed(3)
    for ggml_type in INT8_TYPES:
        block, type_size = GGUF_KERNEL_TYPES[ggml_type]
        raw = torch.empty(24, 512 // block * type_size, dtype=torch.uint8)
        _random_blocks(ggml_type)(raw, gen)
        codes, scales, offsets = blocks_as_int8(raw, ggml_type, 512)
        assert codes.dtype == torch.int8 and scales.shape == (512 // INT8_GROUPS[ggml_type], 24)
        assert (offsets is not None) == (ggml_type == 13)
        weight = dequantize_int8_experts(codes, scales, offsets, INT8_GROUPS[ggml_type])
        assert torch.equal(weight, dequantize_gguf(raw, ggml_type, 512)), ggml_type
    x = np.random.default_rng(4).standard_normal((8, 256)).astype(np.float32)  # realistic Q6_K scales
    raw = torch.from_numpy(quantize_q6_k(x))
    codes, scales, _ = blocks_as_int8(raw, 14, 256)
    assert torch.equal(dequantize_int8_experts(codes, scales, None, 16), dequantize_gguf(raw, 14, 256))


def test_q4_k_writer_round_trips_through_the_dequantizer():
    x = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    raw = torch.from_numpy(quantize_q4_k(x))
    blocks = raw.reshape(6, 2, 144)
    scale, _ = _k_scale_min(blocks)
    step = (blocks[..., 0:2].contiguous().view(torch.float16).float() * scale).repeat_interleave(32, -1)
    err = (dequantize_gguf(raw, Q4_K, 512) - torch.from_numpy(x)).abs()
    assert (err <= step.reshape(6, 512) * 0.5 + 0.05).all()  # half a step, and the 6-bit scales' rounding


@pytest.mark.parametrize("ggml_type", TYPES, ids=TYPE_IDS)
def test_torch_dequantize_matches_gguf_package(ggml_type):
    k = 512
    raw = random_blocks(ggml_type, 7, k, seed=ggml_type)
    expected = dequantize(raw, GGMLQuantizationType(ggml_type))
    ours = dequantize_gguf(torch.from_numpy(raw), ggml_type, k).numpy()
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("ggml_type", TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("m,n,k", [(1, 40, 256), (5, 33, 512), (24, 17, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if KERNEL_DEVICE == "cuda" else []))
def test_kernel_matches_reference(ggml_type, m, n, k, dtype):
    if ggml_type in (Q4_K, Q5_K, Q6_K) and dtype == torch.float16 and m != 5 and KERNEL_DEVICE == "cpu":
        pytest.skip("one fp16 shape per k-quant keeps the interpreter run short")
    raw = torch.from_numpy(random_blocks(ggml_type, n, k, seed=m * n + k)).to(KERNEL_DEVICE)
    gen = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k, generator=gen).to(KERNEL_DEVICE, dtype)
    bias = torch.randn(n, generator=gen).to(KERNEL_DEVICE, dtype)
    out = gguf_gemm(x, raw, ggml_type, bias)
    expected = gguf_linear_ref(x, raw, ggml_type, bias, out_dtype=torch.float32)
    assert out.dtype == dtype and out.shape == (m, n)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    if dtype == torch.float32 and KERNEL_DEVICE == "cuda":
        tol = 1e-2  # the tl.dot path (M > 16) multiplies fp32 in tf32 on the GPU
    scale = expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= tol * scale + tol


@pytest.mark.parametrize("ggml_type", [2, 3, 8], ids=["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("m,n,k", [(1, 33, 96), (2, 5, 32), (3, 40, 160), (4, 70, 256)])
def test_word_load_decode_kernel_matches_reference(ggml_type, m, n, k):
    """The M <= 4 kernel of the 32-element types (``_gguf_small_decode_kernel``): one row (per-weight FMA path) and
    two to four (per-block dot path), ragged N, and K that leaves the last iteration's blocks partly past the end."""
    raw = torch.from_numpy(random_blocks(ggml_type, n, k, seed=7 * m + n + k)).to(KERNEL_DEVICE)
    gen = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, k, generator=gen).to(KERNEL_DEVICE)
    bias = torch.randn(n, generator=gen).to(KERNEL_DEVICE)
    expected = gguf_linear_ref(x, raw, ggml_type, bias, out_dtype=torch.float32)
    torch.testing.assert_close(gguf_gemm(x, raw, ggml_type, bias), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ggml_type,m,small", [(3, 1, True), (8, 4, True), (2, 3, True), (3, 5, False),
                                                (12, 1, False)])
def test_word_load_kernel_takes_the_small_batches_of_its_types(monkeypatch, ggml_type, m, small):
    import kernels.gguf_gemm as module

    launched = []
    kernel = module._gguf_small_decode_kernel

    class Recorder:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    monkeypatch.setattr(module, "_gguf_small_decode_kernel", Recorder())
    raw = torch.from_numpy(random_blocks(ggml_type, 8, 256, seed=1)).to(KERNEL_DEVICE)
    gguf_gemm(torch.randn(m, 256).to(KERNEL_DEVICE), raw, ggml_type)
    assert bool(launched) == small


def test_kernel_float32_output_from_half_input():
    """The tied LM head asks for fp32 logits from bf16/fp16 hidden states."""
    raw = torch.from_numpy(random_blocks(8, 48, 256, seed=3)).to(KERNEL_DEVICE)
    x = torch.randn(2, 256).to(KERNEL_DEVICE, torch.float16)
    out = gguf_gemm(x, raw, 8, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, gguf_linear_ref(x, raw, 8, out_dtype=torch.float32), rtol=3e-3, atol=3e-3)


def test_rejects_rows_that_do_not_hold_k():
    raw = torch.zeros(4, 20, dtype=torch.uint8)
    with pytest.raises(ValueError, match="do not hold"):
        gguf_gemm(torch.zeros(1, 64), raw, 3)


@pytest.mark.parametrize("ggml_type", [2, 3, 12], ids=["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_q4_blocks_as_int4_computes_the_same_weight(ggml_type, dtype):
    """Q4_0 / Q4_1 / Q4_K repacked for the w4a16 int4 kernels (group 32: a block, a Q4_K sub-block): the int4
    reference on the repacked weight equals the GGUF reference to fp32 rounding, and to the rounding of the scales
    (bf16: Q4_0's fp16 ``d``; Q4_K's ``d * sc``) and fractional zero points (Q4_1 ``-m / d``, Q4_K ``dmin * m /
    (d * sc)``) in a 16-bit activation dtype."""
    n, k = 24, 256
    raw = torch.from_numpy(random_blocks(ggml_type, n, k, seed=11 + ggml_type))
    codes, scales, zeros = q4_blocks_as_int4(raw, ggml_type, k, dtype)
    assert codes.shape == (k, n) and scales.shape == zeros.shape == (k // 32, n)
    assert scales.dtype == zeros.dtype == dtype
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    ours = int4_linear_ref(x, pack_int4_kernel(codes), scales, zeros, 32)
    expected = gguf_linear_ref(x, raw, ggml_type, out_dtype=torch.float32)
    exact = dtype == torch.float32 or (ggml_type == 2 and dtype == torch.float16)  # Q4_0's d is an fp16
    tol = 1e-5 if exact else {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(ours, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("ggml_type", [2, 3, 12], ids=["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_blocks_as_int4_offsets_give_each_weight_rounded_once(ggml_type, dtype):
    """``offsets=True`` (the int4 experts' form, ``W = q * s + o``): fp32 gives the GGUF weights bit for bit (the
    scale and offset products are exact), a 16-bit dtype each weight within the rounding of ``s`` and ``o``."""
    from kernels.int4_gemm import dequantize_int4_offsets

    n, k = 24, 512
    raw = torch.from_numpy(random_blocks(ggml_type, n, k, seed=5 + ggml_type))
    codes, scales, offsets = q4_blocks_as_int4(raw, ggml_type, k, dtype, offsets=True)
    assert scales.shape == offsets.shape == (k // 32, n) and offsets.dtype == dtype
    ours = dequantize_int4_offsets(pack_int4_kernel(codes), scales, offsets, 32).t()
    expected = dequantize_gguf(raw, ggml_type, k)
    if dtype == torch.float32:
        assert torch.equal(ours, expected)
    else:
        torch.testing.assert_close(ours, expected, rtol=0, atol=2 ** -8 * expected.abs().max().item())


def test_q4_1_constant_blocks_and_unfit_scales():
    """A Q4_1 block with d = 0 is the constant m (ggml writes its quants as 0): s = m, z = -1. Non-zero quants there,
    or a z = -m / d past fp16's range, cannot take the int4 form: None (the layer keeps its blocks)."""
    k = 64
    raw = torch.from_numpy(random_blocks(3, 2, k, seed=4)).reshape(2, 2, 20)
    raw[0, 1, 0:2] = torch.tensor([0.0], dtype=torch.float16).view(torch.uint8)  # d = 0
    raw[0, 1, 2:4] = torch.tensor([0.25], dtype=torch.float16).view(torch.uint8)  # m = 0.25
    raw[0, 1, 4:] = 0
    raw = raw.reshape(2, 40)
    codes, scales, zeros = q4_blocks_as_int4(raw, 3, k, torch.float32)
    weight = (codes.float() - zeros.repeat_interleave(32, 0)) * scales.repeat_interleave(32, 0)  # [K, N]
    torch.testing.assert_close(weight.t(), dequantize_gguf(raw, 3, k))
    assert torch.all(weight[32:, 0] == 0.25)
    stray = raw.clone().reshape(2, 2, 20)
    stray[0, 1, 10] = 0x31
    assert q4_blocks_as_int4(stray.reshape(2, 40), 3, k, torch.float32) is None
    tiny = raw.clone().reshape(2, 2, 20)
    tiny[1, 0, 0:2] = torch.tensor([1e-7], dtype=torch.float16).view(torch.uint8)  # subnormal d: -m / d ~ 1e5
    tiny[1, 0, 2:4] = torch.tensor([-0.01], dtype=torch.float16).view(torch.uint8)
    assert q4_blocks_as_int4(tiny.reshape(2, 40), 3, k, torch.float16) is None
    assert q4_blocks_as_int4(tiny.reshape(2, 40), 3, k, torch.bfloat16) is not None


def test_q4_k_constant_sub_blocks_and_unfit_scales():
    """A Q4_K sub-block whose 6-bit scale is 0 is the constant ``-dmin * m``, whatever its quants (ggml's quantizer
    leaves them there): its codes become 0, ``s = -dmin * m, z = -1``. A ``z = dmin * m / (d * sc)`` past fp16's
    range (a subnormal ``d``) cannot take the zero-point form in fp16: None; bf16 and the offsets form hold it."""
    k = 256
    x = np.random.default_rng(3).standard_normal((2, k)).astype(np.float32)
    raw = torch.from_numpy(quantize_q4_k(x)).reshape(2, 144)
    raw[0, 4] &= 0xC0  # sub-block 0 of row 0: scale 0, min and quants kept
    raw[0, 8] = (raw[0, 8] & 0xC0) | 5
    assert int(raw[0, 16] & 0xF) or int(raw[0, 17] & 0xF)  # quants that are not 0
    codes, scales, zeros = q4_blocks_as_int4(raw, Q4_K, k, torch.float32)
    weight = (codes.float() - zeros.repeat_interleave(32, 0)) * scales.repeat_interleave(32, 0)  # [K, N]
    torch.testing.assert_close(weight.t(), dequantize_gguf(raw, Q4_K, k))
    dmin = raw[0, 2:4].contiguous().view(torch.float16).float()
    assert torch.all(codes[:32, 0] == 0) and torch.all(weight[:32, 0] == -5 * dmin)
    tiny = raw.clone()
    tiny[1, 0:2] = torch.tensor([1e-7], dtype=torch.float16).view(torch.uint8)  # d subnormal: z ~ 1e5 and more
    assert q4_blocks_as_int4(tiny, Q4_K, k, torch.float16) is None
    assert q4_blocks_as_int4(tiny, Q4_K, k, torch.bfloat16) is not None
    assert q4_blocks_as_int4(tiny, Q4_K, k, torch.float16, offsets=True) is not None


@pytest.mark.parametrize("ggml_type", [2, 3, 12], ids=["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("m", [1, 20])
def test_q4_repacked_runs_on_the_int4_tl_dot_kernel(ggml_type, m):
    """The int4 tl.dot kernel (the path Q4_0, Q4_1 and Q4_K take past the decode kernels) on a repacked weight,
    group 32, fractional zero points (Q4_1, Q4_K), against the GGUF reference; fp16 activations (interpreted on
    CPU)."""
    n, k = 40, 256 if ggml_type == Q4_K else 128
    raw = torch.from_numpy(random_blocks(ggml_type, n, k, seed=5 * m + ggml_type)).to(KERNEL_DEVICE)
    codes, scales, zeros = q4_blocks_as_int4(raw, ggml_type, k, torch.float16)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(KERNEL_DEVICE, torch.float16)
    out = int4_gemm(x, pack_int4_kernel(codes), scales, zeros, 32)
    expected = gguf_linear_ref(x, raw, ggml_type, out_dtype=torch.float32)
    assert (out.float() - expected).abs().max().item() <= 3e-3 * expected.abs().max().item() + 3e-3


def test_fractional_zero_points_take_the_mma_kind(monkeypatch):
    """``integer_zeros=False`` (Q4_1): a shape whose measured decode kernel is the tensor-core kernel runs its ``mma``
    kind (which adds the zero point's fractional part apart), an ``mms`` config as the ``mma`` one of the same
    tiles; whole-number zeros keep the table's config."""
    import kernels.int4_gemm as module

    calls = []
    monkeypatch.setattr(module, "int4_mma_gemm",
                        lambda *args, **kwargs: calls.append((args[5].kind, args[5].block_k, kwargs["integer_zeros"])))
    x = torch.zeros(1, 4096)
    config = module.pick_int4_config(1, 6144, 4096, 128)  # a measured mms entry (group 128)
    assert config.kind == "mms"
    qweight, scales = torch.zeros(6144, 512, dtype=torch.int32), torch.zeros(32, 6144)
    module.int4_decode_or_prefill_gemm(x, qweight, scales, scales, 128, integer_zeros=True)
    module.int4_decode_or_prefill_gemm(x, qweight, scales, scales, 128, integer_zeros=False)
    assert calls == [("mms", config.block_k, True), ("mma", config.block_k, False)]


@pytest.mark.gpu
@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("ggml_type", [2, 3, 12], ids=["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("m", [1, 4, 16, 100])
def test_q4_repacked_int4_kernels_match_gguf_reference(ggml_type, m):
    """The int4 kernels the GGUF layer calls (the tensor-core decode kernel up to 16 rows: Q4_0's whole-number zeros
    in the weight, Q4_1's and Q4_K's fractional ones apart; tl.dot past it) on a repacked Q4 weight at Llama-like
    shapes against the GGUF reference, bf16 activations (Q4_K: ggml-like blocks of Gaussian weights)."""
    n, k = 1536, 2048
    blocks = random_blocks(ggml_type, n, k, seed=m, scale=2e-3).reshape(n, k // 32, -1)
    if ggml_type == 3:  # a d that rounded to 0 makes a constant block, whose quants ggml writes as 0
        blocks[(blocks[..., 0:2].view(np.float16)[..., 0] == 0), 4:] = 0
    if ggml_type == Q4_K:
        blocks = quantize_q4_k(np.random.default_rng(m).standard_normal((n, k)).astype(np.float32) * 0.02)
    raw = torch.from_numpy(blocks.reshape(n, -1)).cuda()
    codes, scales, zeros = q4_blocks_as_int4(raw, ggml_type, k, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = int4_linear(x, pack_int4_kernel(codes), scales, zeros, 32, integer_zeros=ggml_type == 2)
    expected = gguf_linear_ref(x, raw, ggml_type, out_dtype=torch.float32)
    assert (out.float() - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()
