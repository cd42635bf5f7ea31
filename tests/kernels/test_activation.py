"""Triton SiLU-and-mul against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul, silu_and_mul_ref, silu_and_mul_triton
from tests.kernels.kernel_testing import KERNEL_DEVICE, TOLERANCE, assert_close


@pytest.mark.parametrize("shape", [(7, 2 * 96), (3, 5, 2 * 1500), (1, 2 * 3072)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(shape[-1])
    x = (2 * torch.randn(*shape, generator=gen)).to(dtype).to(KERNEL_DEVICE)
    out = silu_and_mul_triton(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert_close(out, silu_and_mul_ref(x.double()), TOLERANCE[dtype], "silu_and_mul")


def test_silu_and_mul_dispatcher_on_cpu():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(silu_and_mul(x), silu_and_mul_ref(x))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, inter", [(256, 3072), (8192, 14336)])
def test_gpu_silu_and_mul_bf16(tokens, inter):
    x = torch.randn(tokens, 2 * inter, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16).cuda()
    assert_close(silu_and_mul(x), silu_and_mul_ref(x.double()), TOLERANCE[torch.bfloat16], "silu_and_mul")
