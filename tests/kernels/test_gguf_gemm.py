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


@pytest.mark.parametrize("ggml_type", [2, 3], ids=["Q4_0", "Q4_1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_q4_blocks_as_int4_computes_the_same_weight(ggml_type, dtype):
    """Q4_0 / Q4_1 repacked for the w4a16 int4 kernels (group 32): the int4 reference on the repacked weight equals
    the GGUF reference to fp32 rounding, and to the rounding of the fp16 ``d`` (bf16) and ``z = -m / d`` (Q4_1) in a
    16-bit activation dtype."""
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


@pytest.mark.parametrize("ggml_type", [2, 3], ids=["Q4_0", "Q4_1"])
@pytest.mark.parametrize("m", [1, 20])
def test_q4_repacked_runs_on_the_int4_tl_dot_kernel(ggml_type, m):
    """The int4 tl.dot kernel (the path Q4_0 and Q4_1 take past the decode kernels) on a repacked weight,
    group 32, fractional zero points (Q4_1), against the GGUF reference; fp16 activations (interpreted on CPU)."""
    n, k = 40, 128
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
@pytest.mark.parametrize("ggml_type", [2, 3], ids=["Q4_0", "Q4_1"])
@pytest.mark.parametrize("m", [1, 4, 16, 100])
def test_q4_repacked_int4_kernels_match_gguf_reference(ggml_type, m):
    """The int4 kernels the GGUF layer calls (the tensor-core decode kernel up to 16 rows: Q4_0's whole-number zeros
    in the weight, Q4_1's fractional ones after each tile's product; tl.dot past it) on a repacked Q4 weight at
    Llama-like shapes against the GGUF reference, bf16 activations."""
    n, k = 1536, 2048
    blocks = random_blocks(ggml_type, n, k, seed=m, scale=2e-3).reshape(n, k // 32, -1)
    if ggml_type == 3:  # a d that rounded to 0 makes a constant block, whose quants ggml writes as 0
        blocks[(blocks[..., 0:2].view(np.float16)[..., 0] == 0), 4:] = 0
    raw = torch.from_numpy(blocks.reshape(n, -1)).cuda()
    codes, scales, zeros = q4_blocks_as_int4(raw, ggml_type, k, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = int4_linear(x, pack_int4_kernel(codes), scales, zeros, 32, integer_zeros=ggml_type == 2)
    expected = gguf_linear_ref(x, raw, ggml_type, out_dtype=torch.float32)
    assert (out.float() - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()
