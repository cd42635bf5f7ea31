"""What the decode and prefill attention kernels share: the layout they accept, the argument checks, the softmax
constant, and the torch pieces their references are built from.

Layout (both kernels): sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` (its ``q_len``
new tokens, at positions ``seq_lens[i] - q_len .. seq_lens[i] - 1``) and reads keys/values of positions
``0 .. seq_lens[i] - 1`` from the cache through ``block_tables[i]`` (the new tokens were written there first). GQA:
query head ``h`` reads KV head ``h // (Hq // Hk)``. ``q`` is ``[T, Hq, D]``; caches ``[num_blocks, block_size, Hk, D]``.

Both kernels serve all query heads of one KV head per program ("GQA packing"): the K/V tiles are read once per KV
head and multiplied against the whole query group with one tl.dot. Softmax runs in the log2 domain (exp2) with the
scale folded into ``scale * LOG2E``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOG2E = 1.4426950408889634


def triton_supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Shapes the Triton kernels handle: power-of-two head dim >= 16, whole query groups, unit-stride last dims."""
    head_dim = q.shape[-1]
    return (
        head_dim >= 16
        and head_dim & (head_dim - 1) == 0
        and q.shape[1] % k_cache.shape[2] == 0
        and q.stride(-1) == 1
        and k_cache.stride(-1) == 1
    )


def check_attention_args(q, k_cache, v_cache, block_tables, out) -> torch.Tensor:
    """Raise on layouts the kernels do not handle; returns ``out``, or a new output when it is None."""
    if not triton_supports(q, k_cache):
        raise ValueError(f"unsupported shapes for the Triton attention: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have the same shape, dtype and unit last stride")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with unit last stride, got {tuple(out.shape)}")
    return out


# ------------------------------------------------------------------------------------------- reference building blocks


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``[B, max_len, Hk, D]`` copies of the first ``max_len`` cached positions of each sequence."""
    block_size, num_heads, head_dim = k_cache.shape[1:]
    num_blocks = -(-max_len // block_size)
    table = block_tables[:, :num_blocks].long()
    batch = table.shape[0]
    keys = k_cache[table].reshape(batch, num_blocks * block_size, num_heads, head_dim)[:, :max_len]
    values = v_cache[table].reshape(batch, num_blocks * block_size, num_heads, head_dim)[:, :max_len]
    return keys, values


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """``q`` ``[B, L, Hq, D]``, keys/values ``[B, S, Hk, D]``, boolean mask ``[B, L, S]`` -> ``[B, L, Hq, D]``."""
    num_q_heads, num_kv_heads = q.shape[2], keys.shape[2]
    if num_q_heads != num_kv_heads:
        repeat = num_q_heads // num_kv_heads
        keys = keys.repeat_interleave(repeat, dim=2)
        values = values.repeat_interleave(repeat, dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask[:, None], scale=scale
    )
    return out.transpose(1, 2)
