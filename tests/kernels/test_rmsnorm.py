"""Triton RMSNorm (plain, fused residual add, strided per-head views) against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from kernels.fp8_linear import quantize_activations, quantize_activations_triton
from kernels.rmsnorm import rms_norm, rms_norm_fp8, rms_norm_fp8_triton, rms_norm_ref, rms_norm_triton
from tests.kernels.kernel_testing import INTERPRETED, KERNEL_DEVICE, TOLERANCE, assert_close


def _randn(gen, *shape, dtype, device):
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


@pytest.mark.parametrize("shape", [(5, 64), (33, 1000), (3, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(shape[1])
    x = _randn(gen, *shape, dtype=dtype, device=KERNEL_DEVICE)
    w = (1 + 0.1 * _randn(gen, shape[1], dtype=torch.float32, device=KERNEL_DEVICE)).to(dtype)
    ref = rms_norm_ref(x.double(), w.double(), 1e-6)
    out = rms_norm_triton(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref, TOLERANCE[dtype], "rms_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_residual_rms_norm_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    x = _randn(gen, 17, 384, dtype=dtype, device=KERNEL_DEVICE)
    residual = _randn(gen, 17, 384, dtype=dtype, device=KERNEL_DEVICE)
    w = _randn(gen, 384, dtype=dtype, device=KERNEL_DEVICE)
    ref_out, ref_res = rms_norm_ref(x.double(), w.double(), 1e-5, residual.double())
    out, new_residual = rms_norm_triton(x.clone(), w, 1e-5, residual.clone())
    assert_close(new_residual, ref_res, TOLERANCE[dtype], "residual sum")
    assert_close(out, ref_out, TOLERANCE[dtype], "normed")


def test_rms_norm_on_strided_head_view():
    """Qwen3's per-head q/k norm on q sliced out of a fused qkv output, without a copy."""
    gen = torch.Generator().manual_seed(4)
    fused = _randn(gen, 6, 4 + 2 + 2, 128, dtype=torch.float32, device=KERNEL_DEVICE)
    q = fused[:, :4]
    w = _randn(gen, 128, dtype=torch.float32, device=KERNEL_DEVICE)
    out = rms_norm_triton(q, w, 1e-6)
    assert_close(out, rms_norm_ref(q.double(), w.double(), 1e-6), TOLERANCE[torch.float32], "strided heads")


@pytest.mark.parametrize("rows, hidden, with_residual", [(1, 4096, True), (5, 96, False), (3, 576, True)])
def test_rms_norm_fp8_quantizes_its_output_like_the_gemm_would(rows, hidden, with_residual):
    """The norm's output quantized per token in the same launch: the bits and scales of ``quantize_activations``
    (what the W8A8 GEMM's own quantization launch gives on the GPU), and the normed output itself unchanged."""
    gen = torch.Generator().manual_seed(rows * hidden)
    x = _randn(gen, rows, hidden, dtype=torch.float16, device=KERNEL_DEVICE)
    residual = _randn(gen, rows, hidden, dtype=torch.float16, device=KERNEL_DEVICE) if with_residual else None
    w = _randn(gen, hidden, dtype=torch.float16, device=KERNEL_DEVICE)
    plain = rms_norm_triton(x.clone(), w, 1e-6, None if residual is None else residual.clone())
    fused, fused_residual = rms_norm_fp8_triton(x.clone(), w, 1e-6, None if residual is None else residual.clone())
    plain_out = plain[0] if with_residual else plain
    assert torch.equal(fused.x, plain_out)
    assert (fused_residual is None) == (residual is None)
    if with_residual:
        assert torch.equal(fused_residual, plain[1])
    # the interpreter's fp32 -> e4m3 cast is off by a step at some ties (tests/kernels/test_fp8_linear.py), the same
    # in the unfused quantization kernel; on the GPU both equal torch's cast
    xq, scale = (quantize_activations_triton if INTERPRETED else quantize_activations)(plain_out)
    assert torch.equal(fused.scale, scale)
    assert torch.equal(fused.xq.view(torch.uint8), xq.view(torch.uint8))


def test_rms_norm_fp8_reference_path_on_cpu():
    gen = torch.Generator().manual_seed(6)
    x, r = (torch.randn(4, 32, generator=gen) for _ in range(2))
    w = torch.randn(32, generator=gen)
    fused, residual = rms_norm_fp8(x, w, 1e-6, r, backend="torch")
    out, ref_residual = rms_norm_ref(x, w, 1e-6, r)
    xq, scale = quantize_activations(out)
    assert torch.equal(fused.x, out) and torch.equal(residual, ref_residual) and torch.equal(fused.scale, scale)
    assert torch.equal(fused.xq.view(torch.uint8), xq.view(torch.uint8))


def test_rms_norm_dispatcher_on_cpu():
    gen = torch.Generator().manual_seed(5)
    x, r, w = (torch.randn(4, 32, generator=gen) for _ in range(3))
    w = w[0]
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    out, res = rms_norm(x, w, 1e-6, r)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-6, r)
    assert torch.equal(out, ref_out) and torch.equal(res, ref_res)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [1024, 4096])
@pytest.mark.parametrize("tokens", [1, 256, 8192])
def test_gpu_fused_residual_rms_norm_bf16(hidden, tokens):
    gen = torch.Generator().manual_seed(tokens)
    x = _randn(gen, tokens, hidden, dtype=torch.bfloat16, device="cuda")
    residual = _randn(gen, tokens, hidden, dtype=torch.bfloat16, device="cuda")
    w = _randn(gen, hidden, dtype=torch.bfloat16, device="cuda")
    ref_out, ref_res = rms_norm_ref(x.double(), w.double(), 1e-6, residual.double())
    out, new_residual = rms_norm(x.clone(), w, 1e-6, residual.clone())
    assert_close(new_residual, ref_res, TOLERANCE[torch.bfloat16], "residual sum")
    assert_close(out, ref_out, TOLERANCE[torch.bfloat16], "normed")
    assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x.double(), w.double(), 1e-6), TOLERANCE[torch.bfloat16], "plain")
