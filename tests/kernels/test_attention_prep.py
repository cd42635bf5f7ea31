"""Fused [q/k norm ->] RoPE -> cache write against the composition of the torch references (float64), with Llama
3.1's long-context frequency scaling in the cos/sin table."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.attention_prep import attention_prep, attention_prep_ref, attention_prep_triton
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


@pytest.mark.parametrize("hq, hk, head_dim, block_size", [(4, 2, 64, 16), (6, 3, 128, 32), (2, 2, 32, 16)])
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


@pytest.mark.parametrize("cache_dtype, slot_dtype", [(torch.float32, torch.int32), (torch.float16, torch.int64)])
def test_attention_prep_cache_write_is_exact_and_skips_padding(cache_dtype, slot_dtype):
    """Values land bit for bit at their slots (cast into the cache dtype), keys match the reference's rotation, and
    padding slots (-1) and every other slot stay untouched; int32 or int64 slot mappings, 3 KV heads (not a power of
    two)."""
    positions, q, k, v, cache, _, slots, _ = _case(37, 6, 3, 64, 16, torch.float32, KERNEL_DEVICE, 2, False)
    slots = slots.to(slot_dtype)
    gen = torch.Generator().manual_seed(3)
    kv = torch.randn(2, 37 // 16 + 3, 16, 3, 64, generator=gen).to(cache_dtype).to(KERNEL_DEVICE)
    before, expected = kv.clone(), kv.clone()
    attention_prep_ref(positions, q.clone(), k, v, cache, expected[0], expected[1], slots)
    attention_prep_triton(positions, q, k, v, cache, kv[0], kv[1], slots)
    assert torch.equal(kv[1], expected[1]), "values are copied exactly, padding skipped"
    assert_close(kv[0], expected[0], TOLERANCE[cache_dtype], "rotated keys")
    untouched = torch.ones(kv.shape[1] * kv.shape[2], dtype=torch.bool)
    untouched[slots[slots >= 0].long().cpu()] = False
    untouched = untouched.to(kv.device)
    assert torch.equal(kv.reshape(2, -1, 3, 64)[:, untouched], before.reshape(2, -1, 3, 64)[:, untouched])


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


@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 16), (32, 24), (80, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_prep_partial_rotary(head_dim, rotary_dim, dtype):
    """GPT-NeoX / Phi partial rotary: the first rotary_dim dims rotate, the rest of q and k pass through unchanged."""
    positions, q, k, v, _, kv, slots, _ = _case(19, 4, 2, head_dim, 16, dtype, KERNEL_DEVICE, rotary_dim, False)
    cache = llama3_cos_sin_cache(rotary_dim, 2048).to(KERNEL_DEVICE)
    kv64 = kv.double()
    q_in = q.clone()
    ref_q = attention_prep_ref(positions, q.double(), k.double(), v.double(), cache.double(), kv64[0], kv64[1], slots)
    assert torch.equal(ref_q[..., rotary_dim:], q_in[..., rotary_dim:].double())
    attention_prep_triton(positions, q, k, v, cache, kv[0], kv[1], slots)
    assert_close(q, ref_q, TOLERANCE[dtype], "q")
    assert_close(kv, kv64, TOLERANCE[dtype], "cache")


@pytest.mark.parametrize("head_dim", [64, 80])
def test_attention_prep_without_rotary(head_dim):
    """GPT-2 / Falcon-ALiBi: an empty cos/sin table; q passes through, k and v only go to the cache."""
    positions, q, k, v, _, kv, slots, _ = _case(7, 4, 1, head_dim, 16, torch.float32, KERNEL_DEVICE, 2, False)
    cache = torch.empty(2048, 0, device=KERNEL_DEVICE)
    kv64 = kv.double()
    q_in = q.clone()
    ref_q = attention_prep_ref(positions, q.double(), k.double(), v.double(), cache.double(), kv64[0], kv64[1], slots)
    attention_prep_triton(positions, q, k, v, cache, kv[0], kv[1], slots)
    assert torch.equal(q, q_in)
    assert_close(q, ref_q, TOLERANCE[torch.float32], "q")
    assert_close(kv, kv64, TOLERANCE[torch.float32], "cache")
