"""Bidirectional varlen encoder attention: the Triton kernel (interpreted on CPU) and the torch reference against a
float64 per-sequence softmax(QK^T)V."""

from __future__ import annotations

import pytest
import torch

from kernels.encoder_attention import encoder_attention_reference, encoder_attention_triton
from tests.kernels.kernel_testing import KERNEL_DEVICE, TOLERANCE, assert_close


def _problem(lens: list[int], heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    fused = torch.randn(total, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype).to(device)
    q, k, v = fused.split([heads, kv_heads, kv_heads], dim=1)  # strided views, as the model hands them over
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q, k, v, cu


def _float64_reference(q, k, v, cu, scale) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs = q[s:e].double().cpu().transpose(0, 1)
        ks = k[s:e].double().cpu().repeat_interleave(group, 1).transpose(0, 1)
        vs = v[s:e].double().cpu().repeat_interleave(group, 1).transpose(0, 1)
        weights = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        out[s:e] = (weights @ vs).transpose(0, 1)
    return out


CASES = [
    ([1], 2, 2, 16),
    ([5, 17, 1, 33], 4, 4, 32),  # MiniLM's head size
    ([70, 3, 129], 2, 1, 24),  # head size padded to 32, GQA, several key blocks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lens,heads,kv_heads,head_dim", CASES)
def test_triton_kernel_matches_float64(lens, heads, kv_heads, head_dim, dtype):
    q, k, v, cu = _problem(lens, heads, kv_heads, head_dim, dtype, KERNEL_DEVICE, seed=sum(lens))
    scale = head_dim**-0.5
    out = encoder_attention_triton(q, k, v, cu, max(lens), scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, _float64_reference(q, k, v, cu, scale), TOLERANCE[dtype], f"triton {lens} {dtype}")


@pytest.mark.parametrize("lens,heads,kv_heads,head_dim", CASES)
def test_torch_reference_matches_float64(lens, heads, kv_heads, head_dim):
    q, k, v, cu = _problem(lens, heads, kv_heads, head_dim, torch.float32, "cpu", seed=7)
    scale = head_dim**-0.5
    out = encoder_attention_reference(q, k, v, cu, max(lens), scale)
    assert_close(out, _float64_reference(q, k, v, cu, scale), TOLERANCE[torch.float32], f"reference {lens}")


def test_sequences_do_not_see_each_other():
    """Changing one sequence's keys leaves the other sequence's output untouched (no cross-sequence attention)."""
    q, k, v, cu = _problem([9, 12], 2, 2, 16, torch.float32, KERNEL_DEVICE, seed=3)
    before = encoder_attention_triton(q, k, v, cu, 12, 0.25)
    k2 = k.clone()
    k2[9:] += 5.0
    after = encoder_attention_triton(q, k2, v, cu, 12, 0.25)
    torch.testing.assert_close(after[:9], before[:9])
    assert not torch.allclose(after[9:], before[9:])
