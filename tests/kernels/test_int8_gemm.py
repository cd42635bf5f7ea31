"""8-bit weights: int8 with a scale per row (bitsandbytes 8-bit) or uint8 with a scale and zero point per group
(GPTQ 8-bit). The Triton kernel (interpreter on CPU) against the dequantize-then-matmul reference at decode and
prefill row counts, K in steps of 32 and 64; the quantizer's codes and scales (bitsandbytes'
``int8_vectorwise_quant``)."""

from __future__ import annotations

import pytest
import torch

import kernels.int8_gemm as int8_gemm
from kernels.int8_gemm import (dequantize_int8, int8_gemm_triton, int8_linear, int8_linear_ref, int8_linear_triton,
                               quantize_int8_rows)
from tests.kernels.kernel_testing import KERNEL_DEVICE, TOLERANCE, assert_close


def test_quantizer_stores_127_steps_of_each_rows_absmax():
    w = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 0.0, -4.0, 1.0]])
    codes, absmax = quantize_int8_rows(w)
    assert absmax.tolist() == [2.0, 4.0]
    assert codes.dtype == torch.int8 and codes.tolist() == [[127, -64, 32, 0], [0, 0, -127, 32]]


@pytest.mark.parametrize("m", [1, 7, 40])
@pytest.mark.parametrize("k", [96, 256])  # steps of 32, of 64
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_kernel_matches_reference(m, k, dtype):
    gen = torch.Generator().manual_seed(m + k)
    n = 80
    codes, absmax = quantize_int8_rows(torch.randn(n, k, generator=gen))
    scale = absmax / 127
    x = torch.randn(m, k, generator=gen).to(dtype)
    codes, scale, x = (t.to(KERNEL_DEVICE) for t in (codes, scale, x))
    out = int8_gemm_triton(x, codes, scale)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, int8_linear_ref(x.double(), codes, scale), 4 * TOLERANCE[dtype], "int8")


@pytest.mark.parametrize("m", [1, 40])
@pytest.mark.parametrize("group, zeros", [(32, True), (64, False), (128, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_uint8_kernel_matches_reference(m, group, zeros, dtype):
    gen = torch.Generator().manual_seed(m + group)
    n, k = 48, 256
    codes = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    scale = torch.rand(n, k // group, generator=gen) * 1e-2 + 1e-3
    zero = torch.randint(100, 156, (n, k // group), generator=gen).float() if zeros else None
    x = torch.randn(m, k, generator=gen).to(dtype)
    codes, scale, x = (t.to(KERNEL_DEVICE) for t in (codes, scale, x))
    zero = zero.to(KERNEL_DEVICE) if zero is not None else None
    out = int8_gemm_triton(x, codes, scale, zero, group)
    assert_close(out, int8_linear_ref(x.double(), codes, scale, None, zero, group), 4 * TOLERANCE[dtype], "uint8")


def test_grouped_dequantization_subtracts_each_groups_zero_point():
    codes = torch.tensor([[130, 126, 0, 255]], dtype=torch.uint8)
    w = dequantize_int8(codes, torch.tensor([[0.5, 2.0]]), torch.tensor([[128.0, 1.0]]), group=2)
    assert w.tolist() == [[1.0, -1.0, -2.0, 508.0]]


def test_dispatcher_on_cpu_takes_reference_and_adds_the_bias():
    codes, absmax = quantize_int8_rows(torch.randn(32, 64))
    x, bias = torch.randn(3, 64), torch.randn(32)
    scale = absmax / 127
    torch.testing.assert_close(int8_linear(x, codes, scale, bias), int8_linear_ref(x, codes, scale) + bias)


def _recording(taken: list[str], name: str, real):
    def call(*args, **kwargs):
        taken.append(name)
        return real(*args, **kwargs)

    return call


@pytest.mark.parametrize("m, group, path", [(1, 0, "gemv"), (1, 32, "gemv"), (2, 0, "tiles"), (2, 32, "tiles"),
                                            (17, 0, "dequant")])  # fmt: skip
def test_rows_choose_the_gemv_the_tile_kernel_or_dequantizing(monkeypatch, m, group, path):
    """One row takes the byte-codes GEMV (scaled by row or in groups), more rows the tile kernel, from
    ``DEQUANT_MIN_M`` rows the dequantized weight; each path gives the reference's product."""
    taken = []
    for name in ("codes_gemv", "int8_gemm_triton", "codes_dequant_gemm"):
        monkeypatch.setattr(int8_gemm, name, _recording(taken, name, getattr(int8_gemm, name)))
    gen = torch.Generator().manual_seed(m + group)
    n, k = 48, 64
    codes, absmax = quantize_int8_rows(torch.randn(n, k, generator=gen))
    scale = (absmax / 127)[:, None].repeat(1, k // group) if group else absmax / 127
    x = torch.randn(m, k, generator=gen)
    out = int8_linear_triton(x.to(KERNEL_DEVICE), codes.to(KERNEL_DEVICE), scale.to(KERNEL_DEVICE), None, group)
    assert taken == [{"gemv": "codes_gemv", "tiles": "int8_gemm_triton", "dequant": "codes_dequant_gemm"}[path]]
    assert_close(out, int8_linear_ref(x.double(), codes, scale, None, None, group), 4 * TOLERANCE[torch.float32], path)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 14336)])
@pytest.mark.parametrize("group", [0, 128], ids=["per-row", "gptq-group-128"])
def test_int8_kernel_on_gpu_at_llama_shapes(m, n, k, group):
    gen = torch.Generator().manual_seed(m)
    codes, absmax = quantize_int8_rows(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    scale, zeros = absmax / 127, None
    if group:  # uint8 codes around a zero point of 128, one scale per group
        codes = (codes.int() + 128).to(torch.uint8)
        scale, zeros = scale[:, None].repeat(1, k // group), torch.full((n, k // group), 128.0)
        zeros = zeros.cuda()
    codes, scale = codes.cuda(), scale.cuda()
    ref = int8_linear_ref(x, codes, scale, None, zeros, group).float()
    assert_close(int8_gemm_triton(x, codes, scale, zeros, group), ref, 1e-2, "int8 gpu")
    assert_close(int8_linear_triton(x, codes, scale, zeros, group), ref, 1e-2, "int8 gpu, by rows")
