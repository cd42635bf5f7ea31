"""Triton KV-cache write against the torch reference: exact copies, padding slots skipped, strided inputs."""

from __future__ import annotations

import pytest
import torch

from kernels.cache_write import write_kv_cache, write_kv_cache_ref, write_kv_cache_triton
from tests.kernels.kernel_testing import KERNEL_DEVICE


def _case(num_tokens, num_heads, head_dim, block_size, num_blocks, src_dtype, cache_dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(num_tokens, 3 * num_heads, head_dim, generator=gen).to(src_dtype).to(device)
    k, v = fused[:, num_heads : 2 * num_heads], fused[:, 2 * num_heads :]  # strided views, like a qkv split
    kv = torch.randn(2, num_blocks, block_size, num_heads, head_dim, generator=gen).to(cache_dtype).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.2] = -1  # padding tokens
    return k, v, kv, slots.to(device)


@pytest.mark.parametrize(
    "num_tokens, num_heads, head_dim, block_size, src_dtype, cache_dtype, slot_dtype",
    [
        (37, 2, 64, 16, torch.float32, torch.float32, torch.int64),
        (20, 3, 128, 32, torch.float16, torch.float16, torch.int32),  # non-power-of-two head count
        (9, 1, 64, 16, torch.float32, torch.float16, torch.int64),  # casts into the cache dtype
    ],
)
def test_cache_write_matches_reference(num_tokens, num_heads, head_dim, block_size, src_dtype, cache_dtype,
                                       slot_dtype):  # fmt: skip
    k, v, kv, slots = _case(num_tokens, num_heads, head_dim, block_size, 8, src_dtype, cache_dtype, KERNEL_DEVICE, 1)
    slots = slots.to(slot_dtype)
    expected = kv.clone()
    write_kv_cache_ref(k, v, expected[0], expected[1], slots)
    write_kv_cache_triton(k, v, kv[0], kv[1], slots)
    assert torch.equal(kv, expected)
    assert not torch.equal(kv, kv.new_zeros(kv.shape))


def test_cache_write_dispatcher_on_cpu():
    k, v, kv, slots = _case(12, 2, 16, 16, 4, torch.float32, torch.float32, "cpu", 2)
    expected = kv.clone()
    write_kv_cache_ref(k, v, expected[0], expected[1], slots)
    write_kv_cache(k, v, kv[0], kv[1], slots)
    assert torch.equal(kv, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 32])
def test_gpu_cache_write_real_shapes(block_size):
    k, v, kv, slots = _case(8192, 8, 128, block_size, 1024, torch.bfloat16, torch.bfloat16, "cuda", block_size)
    expected = kv.clone()
    write_kv_cache_ref(k, v, expected[0], expected[1], slots)
    write_kv_cache(k, v, kv[0], kv[1], slots)
    assert torch.equal(kv, expected)
