"""Fused [q/k norm ->] RoPE -> cache write against the composition of the torch references (float64)."""

from __future__ import annotations

import pytest
import torch

from kernels.attention_prep import attention_prep, attention_prep_ref, attention_prep_triton
from tests.kernels.kernel_testing import KERNEL_DEVICE, TOLERANCE, assert_close
from tests.kernels.test_rotary import llama3_cos_sin_cache


def _case(tokens, hq, hk, head_dim, block_size, dtype, device, seed, with_norm):
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(tokens, hq + 2 * hk, head_dim, generator=gen).to(dtype).to(device)
    q, k, v = fused[:, :hq], fused[:, hq : hq + hk], fused[:, hq + hk :]
    num_blocks = tokens // block_size + 3
    kv = torch.randn(2, num_blocks, block_size, hk, head_dim, generator=gen).to(dtype).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < 0.2] = -1
    positions = torch.randint(0, 2048, (tokens,), generator=gen)
    weights = None
    if with_norm:
        weights = tuple((1 + 0.2 * torch.randn(head_dim, generator=gen)).to(dtype).to(device) for _ in range(2))
    cache = llama3_cos_sin_cache(head_dim, 2048).to(device)
    return positions.to(device), q, k, v, cache, kv, slots.to(device), weights


@pytest.mark.parametrize("hq, hk, head_dim, block_size", [(4, 2, 64, 16), (6, 3, 128, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_norm", [False, True])
def test_attention_prep_matches_reference(hq, hk, head_dim, block_size, dtype, with_norm):
    positions, q, k, v, cache, kv, slots, w = _case(21, hq, hk, head_dim, block_size, dtype, KERNEL_DEVICE, hq,
                                                    with_norm)  # fmt: skip
    w64 = (w[0].double(), w[1].double()) if w else (None, None)
    kv64 = kv.double()
    ref_q = attention_prep_ref(positions, q.double(), k.double(), v.double(), cache.double(), kv64[0], kv64[1], slots,
                               *w64)  # fmt: skip
    k_before, v_before = k.clone(), v.clone()
    out = attention_prep_triton(positions, q, k, v, cache, kv[0], kv[1], slots, *(w or (None, None)))
    assert out.data_ptr() == q.data_ptr()
    assert_close(q, ref_q, TOLERANCE[dtype], "q")
    assert_close(kv, kv64, TOLERANCE[dtype], "cache")
    assert torch.equal(k, k_before) and torch.equal(v, v_before), "k and v are read only"
    written = slots >= 0
    flat_v = kv[1].reshape(-1, hk, head_dim)
    assert torch.equal(flat_v[slots[written]], v[written].to(kv.dtype)), "values are copied exactly"


def test_attention_prep_dispatcher_on_cpu():
    positions, q, k, v, cache, kv, slots, w = _case(9, 4, 2, 16, 16, torch.float32, "cpu", 1, True)
    expected_kv = kv.clone()
    expected_q = attention_prep_ref(positions, q, k, v, cache, expected_kv[0], expected_kv[1], slots, *w)
    out = attention_prep(positions, q, k, v, cache, kv[0], kv[1], slots, *w)
    assert torch.equal(out, expected_q) and torch.equal(kv, expected_kv)


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hk", [(16, 8), (32, 8)])
@pytest.mark.parametrize("with_norm", [False, True])
def test_gpu_attention_prep_bf16(hq, hk, with_norm):
    positions, q, k, v, cache, kv, slots, w = _case(4096, hq, hk, 128, 16, torch.bfloat16, "cuda", hq, with_norm)
    w64 = (w[0].double(), w[1].double()) if w else (None, None)
    kv64 = kv.double()
    ref_q = attention_prep_ref(positions, q.double(), k.double(), v.double(), cache.double(), kv64[0], kv64[1], slots,
                               *w64)  # fmt: skip
    out = attention_prep(positions, q, k, v, cache, kv[0], kv[1], slots, *(w or (None, None)))
    assert_close(out, ref_q, TOLERANCE[torch.bfloat16], "q")
    assert_close(kv, kv64, TOLERANCE[torch.bfloat16], "cache")
