"""Write the new tokens' keys and values into the paged KV cache through the slot mapping."""

from __future__ import annotations

import torch


def write_kv_cache_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """``k``/``v``: ``[T, Hk, D]``; caches: ``[num_blocks, block_size, Hk, D]``; slot = block * block_size + offset.

    Negative slots (padding) are skipped.
    """
    num_heads, head_dim = k_cache.shape[-2:]
    flat_k = k_cache.view(-1, num_heads, head_dim)
    flat_v = v_cache.view(-1, num_heads, head_dim)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, k, v = slot_mapping[valid], k[valid], v[valid]
    flat_k.index_copy_(0, slot_mapping.long(), k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping.long(), v.to(flat_v.dtype))


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)
