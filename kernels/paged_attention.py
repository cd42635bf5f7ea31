"""Causal attention over the paged KV cache, for any mix of prefill chunks and decodes.

Sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` (its ``q_len`` new tokens, at positions
``seq_lens[i] - q_len .. seq_lens[i] - 1``) and reads keys/values of positions ``0 .. seq_lens[i] - 1`` from the
cache through ``block_tables[i]`` (the new tokens were written there first). GQA: query head ``h`` reads KV head
``h // (Hq // Hk)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain-torch reference: decodes in one padded batch, prefill chunks one sequence at a time.

    ``q``: ``[T, Hq, D]``; caches ``[num_blocks, block_size, Hk, D]``; returns ``[T, Hq, D]`` in ``q``'s dtype.
    Reads the lengths on the host (a sync): fine for CPU and for tests, not for the GPU fast path.
    """
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
    decode_rows = [i for i, n in enumerate(q_lens) if n == 1]
    if decode_rows:
        rows = torch.tensor(decode_rows, device=q.device)
        token_rows = query_start_loc[:-1].index_select(0, rows).long()
        max_len = max(lens[i] for i in decode_rows)
        keys, values = _gather_kv(k_cache, v_cache, block_tables.index_select(0, rows), max_len)
        mask = torch.arange(max_len, device=q.device)[None, :] < seq_lens.index_select(0, rows)[:, None]
        out[token_rows] = _attend(q[token_rows].unsqueeze(1), keys, values, mask[:, None, :], scale).squeeze(1)
    for i, n in enumerate(q_lens):
        if n <= 1:
            continue
        start, seq_len = starts[i], lens[i]
        keys, values = _gather_kv(k_cache, v_cache, block_tables[i : i + 1], seq_len)
        query_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
        out[start : start + n] = _attend(q[None, start : start + n], keys, values, mask[None], scale)[0]
    return out


def _gather_kv(
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


def _attend(
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


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
