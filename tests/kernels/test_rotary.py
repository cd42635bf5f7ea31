"""Triton in-place rotary embedding against a float64 reference, with llama3-scaled frequencies."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.rotary import rotary_embedding, rotary_embedding_ref, rotary_embedding_triton
from tests.kernels.kernel_testing import KERNEL_DEVICE, TOLERANCE, assert_close


def llama3_cos_sin_cache(head_dim: int, max_positions: int, theta: float = 500000.0) -> torch.Tensor:
    """``[max_positions, head_dim]`` float32: cos | sin, with Llama 3.1's long-context frequency scaling."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factor, low, high, original = 8.0, 1.0, 4.0, 8192
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen) - low) / (high - low)
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= original / low) & (wavelen >= original / high)
    scaled = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * scaled[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float()


def _qk(gen, tokens, hq, hk, head_dim, dtype, device):
    fused = torch.randn(tokens, hq + 2 * hk, head_dim, generator=gen).to(dtype).to(device)
    return fused[:, :hq], fused[:, hq : hq + hk]  # strided views of a fused qkv output


@pytest.mark.parametrize("hq, hk, head_dim", [(4, 2, 64), (6, 3, 128), (2, 2, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_matches_reference_in_place(hq, hk, head_dim, dtype):
    gen = torch.Generator().manual_seed(hq * head_dim)
    cache = llama3_cos_sin_cache(head_dim, 4096).to(KERNEL_DEVICE)
    q, k = _qk(gen, 19, hq, hk, head_dim, dtype, KERNEL_DEVICE)
    positions = torch.randint(0, 4096, (19,), generator=gen).to(KERNEL_DEVICE)
    ref_q, ref_k = rotary_embedding_ref(positions, q.double(), k.double(), cache.double())
    out_q, out_k = rotary_embedding_triton(positions, q, k, cache)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert_close(q, ref_q, TOLERANCE[dtype], "q")
    assert_close(k, ref_k, TOLERANCE[dtype], "k")


def test_rotary_dispatcher_on_cpu_returns_reference():
    gen = torch.Generator().manual_seed(8)
    cache = llama3_cos_sin_cache(16, 64)
    q, k = _qk(gen, 5, 2, 1, 16, torch.float32, "cpu")
    positions = torch.tensor([0, 3, 63, 7, 7])
    out_q, out_k = rotary_embedding(positions, q, k, cache)
    ref_q, ref_k = rotary_embedding_ref(positions, q, k, cache)
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hk", [(16, 8), (32, 8)])
def test_gpu_rotary_bf16_real_shapes(hq, hk):
    gen = torch.Generator().manual_seed(hq)
    cache = llama3_cos_sin_cache(128, 8192).cuda()
    q, k = _qk(gen, 4096, hq, hk, 128, torch.bfloat16, "cuda")
    positions = torch.randint(0, 8192, (4096,), generator=gen).cuda()
    ref_q, ref_k = rotary_embedding_ref(positions, q.double(), k.double(), cache.double())
    out_q, out_k = rotary_embedding(positions, q, k, cache)
    assert_close(out_q, ref_q, TOLERANCE[torch.bfloat16], "q")
    assert_close(out_k, ref_k, TOLERANCE[torch.bfloat16], "k")
