"""int8 weights with a scale per row (bitsandbytes 8-bit): the Triton kernel (interpreter on CPU) against the
dequantize-then-matmul reference at decode and prefill row counts, K in steps of 32 and 64; the quantizer's codes
and scales (bitsandbytes' ``int8_vectorwise_quant``)."""

from __future__ import annotations

import pytest
import torch

from kernels.int8_gemm import int8_gemm_triton, int8_linear, int8_linear_ref, quantize_int8_rows
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


def test_dispatcher_on_cpu_takes_reference_and_adds_the_bias():
    codes, absmax = quantize_int8_rows(torch.randn(32, 64))
    x, bias = torch.randn(3, 64), torch.randn(32)
    torch.testing.assert_close(int8_linear(x, codes, absmax / 127, bias), int8_linear_ref(x, codes, absmax / 127) + bias)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 14336)])
def test_int8_kernel_on_gpu_at_llama_shapes(m, n, k):
    gen = torch.Generator().manual_seed(m)
    codes, absmax = quantize_int8_rows(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    codes, scale = codes.cuda(), (absmax / 127).cuda()
    assert_close(int8_gemm_triton(x, codes, scale), int8_linear_ref(x, codes, scale).float(), 1e-2, "int8 gpu")
