"""Causal attention over the paged KV cache, for any mix of prefill chunks and decodes.

Sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` (its ``q_len`` new tokens, at positions
``seq_lens[i] - q_len .. seq_lens[i] - 1``) and reads keys/values of positions ``0 .. seq_lens[i] - 1`` from the
cache through ``block_tables[i]`` (the new tokens were written there first). GQA: query head ``h`` reads KV head
``h // (Hq // Hk)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.backend import num_sms, use_triton


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


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Both kernels serve all query heads of one KV head per program ("GQA packing"): the K/V tiles are read once per KV
# head and multiplied against the whole query group with one tl.dot, so a decode step reads the cache exactly once.
# Softmax runs in the log2 domain (exp2) with the scale folded into ``scale_log2``.
# ---------------------------------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634


# Decode launch orders (the ORDER constexpr). The hardware starts programs roughly in linear-id order, so the order
# decides which programs run last: when the lengths differ, long programs started late leave SMs idle at the end.
ORDER_HEAD_MAJOR = 0  # the original 3D grid (B, Hk, splits): every sequence for KV head 0, then for head 1, ...
ORDER_SEQ_MAJOR = 1  # 1D grid, sequences in batch order, all KV heads and splits of a sequence next to each other
ORDER_PERMUTED = 2  # 1D grid, sequences in the order of a permutation tensor (longest first: LPT scheduling)


@triton.jit
def _decode_kernel(
    out_ptr,  # [T, Hq, D] (written by single-split sequences, and by the last split when FUSED_REDUCE)
    part_out_ptr,  # [B, Hq, NUM_SPLITS, D] float32 (written when NUM_SPLITS > 1)
    part_lse_ptr,  # [B, Hq, NUM_SPLITS] float32, log2-domain log-sum-exp of each split
    counter_ptr,  # [B, Hk] int32, all zero between launches (FUSED_REDUCE only)
    order_ptr,  # [B] int32 permutation of the sequences, launch order (ORDER_PERMUTED only)
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,
    num_kv_heads,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    ORDER: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    IEEE: tl.constexpr,
):
    if ORDER == 0:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
    else:
        pid = tl.program_id(0)
        per_seq = num_kv_heads * NUM_SPLITS
        rank = pid // per_seq
        rest = pid - rank * per_seq
        kv_head = rest // NUM_SPLITS
        split = rest - kv_head * NUM_SPLITS
        if ORDER == 2:
            seq = tl.load(order_ptr + rank)
        else:
            seq = rank
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_row:
        return  # a sequence with no query row this step
    seq_len = tl.load(seq_lens_ptr + seq)
    # Each split covers a TILE_N-aligned share of this sequence's context; short sequences leave late splits empty.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), TILE_N) * TILE_N
    num_active = tl.cdiv(seq_len, tl.maximum(split_len, 1))  # 0 when seq_len == 0
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if NUM_SPLITS > 1:
        if FUSED_REDUCE:
            if (split > 0) & (start >= seq_len):
                return  # split 0 of an empty sequence stays: it writes the zero row
        elif start >= seq_len:
            return  # the reduce kernel derives the same split count from seq_len and never reads this one

    offs_h = tl.arange(0, BLOCK_H)
    head_mask = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=head_mask[:, None], other=0.0
    )
    q = q.to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    for tile_start in range(start, end, TILE_N):
        offs_n = tile_start + tl.arange(0, TILE_N)
        valid = offs_n < end
        page = tl.load(table + offs_n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        in_page = offs_n % BLOCK_SIZE
        k = tl.load(
            k_base + (page * stride_kb + in_page * stride_ks)[None, :] + offs_d[:, None],
            mask=valid[None, :],
            other=0.0,
        )  # [D, TILE_N]
        v = tl.load(
            v_base + (page * stride_vb + in_page * stride_vs)[:, None] + offs_d[None, :],
            mask=valid[:, None],
            other=0.0,
        )  # [TILE_N, D]
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    safe_l = tl.where(l_i > 0.0, l_i, 1.0)  # seq_len == 0 (graph padding) gives zeros, not NaN
    out = acc / safe_l[:, None]
    out_ptrs = out_ptr + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    num_q_heads = num_kv_heads * GROUP
    part = (seq * num_q_heads + heads) * NUM_SPLITS + split  # [BLOCK_H]
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    elif not FUSED_REDUCE:
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=head_mask[:, None])
        tl.store(part_lse_ptr + part, m_i + tl.log2(safe_l), mask=head_mask)
    elif num_active <= 1:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])  # nothing to merge
    else:
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=head_mask[:, None])
        tl.store(part_lse_ptr + part, m_i + tl.log2(safe_l), mask=head_mask)
        # The last split of this (sequence, KV head) to finish merges all of them ("last arriver reduces"): every
        # thread's partial stores are ordered before the counter increment by the CTA barrier, and the increment
        # is a gpu-scope release/acquire, so the last arriver sees every partial; it reads them through L2 (.cg).
        tl.debug_barrier()
        counter = counter_ptr + seq * num_kv_heads + kv_head
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if ticket == num_active - 1:
            tl.store(counter, 0)  # ready for the next launch (stream order puts it before the next kernel)
            _merge_splits(out_ptr, part_out_ptr, part_lse_ptr, q_row, seq, kv_head, num_q_heads, num_active,
                          stride_ot, stride_oh, GROUP, GROUP_PAD, HEAD_DIM, NUM_SPLITS, SPLITS_PAD,
                          SPLIT_CHUNK)  # fmt: skip


@triton.jit
def _merge_splits(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    q_row,
    seq,
    kv_head,
    num_q_heads,
    num_active,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    """Weights ``2^(lse_s - max lse)`` over the ``num_active >= 2`` splits of one KV head's query group, then the
    weighted sum of the split outputs ``SPLIT_CHUNK`` splits at a time (keeps the [group, chunk, D] tile small)."""
    offs_g = tl.arange(0, GROUP_PAD)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    base = (seq * num_q_heads + heads) * NUM_SPLITS  # [GROUP_PAD]
    offs_s = tl.arange(0, SPLITS_PAD)
    lse = tl.load(
        part_lse_ptr + base[:, None] + offs_s[None, :],
        mask=g_mask[:, None] & (offs_s < num_active)[None, :],
        other=float("-inf"),
        cache_modifier=".cg",
    )
    lse_max = tl.where(g_mask, tl.max(lse, 1), 0.0)  # every active split has >= 1 key, so its lse is finite
    total = tl.sum(tl.exp2(lse - lse_max[:, None]), 1)
    total = tl.where(g_mask, total, 1.0)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for chunk_start in range(0, num_active, SPLIT_CHUNK):
        offs_c = chunk_start + tl.arange(0, SPLIT_CHUNK)
        mask = g_mask[:, None] & (offs_c < num_active)[None, :]  # [GROUP_PAD, SPLIT_CHUNK]
        rows = base[:, None] + offs_c[None, :]
        lse_c = tl.load(part_lse_ptr + rows, mask=mask, other=float("-inf"), cache_modifier=".cg")
        weight = tl.exp2(lse_c - lse_max[:, None])  # 0 for masked splits
        parts = tl.load(
            part_out_ptr + rows[:, :, None] * HEAD_DIM + offs_d[None, None, :],
            mask=mask[:, :, None],
            other=0.0,
            cache_modifier=".cg",
        )
        acc += tl.sum(parts * weight[:, :, None], 1)
    out = acc / total[:, None]
    tl.store(
        out_ptr + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=g_mask[:, None],
    )


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_row:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), TILE_N) * TILE_N
    num_active = tl.cdiv(seq_len, tl.maximum(split_len, 1))  # 0 when seq_len == 0
    offs_s = tl.arange(0, SPLITS_PAD)
    active = offs_s < num_active
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + part, mask=active, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(num_active > 0, lse_max, 0.0)
    weight = tl.exp2(lse - lse_max)  # 0 for inactive splits
    offs_d = tl.arange(0, HEAD_DIM)
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=active[:, None], other=0.0)
    total = tl.maximum(tl.sum(weight, 0), 1e-30)
    out = tl.sum(parts * weight[:, None], 0) / total
    tl.store(out_ptr + q_row * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


_ORDER_INDEX_BITS = 16  # sort keys: length << 16 | (65535 - index); batches up to 65536 sequences


@triton.jit
def _decode_order_kernel(order_ptr, seq_lens_ptr, num_seqs, BLOCK: tl.constexpr, INDEX_BITS: tl.constexpr):
    """One program: the sequence indices by decreasing length (ties: increasing index), for ORDER_PERMUTED."""
    offs = tl.arange(0, BLOCK)
    live = offs < num_seqs
    lens = tl.load(seq_lens_ptr + offs, mask=live, other=0).to(tl.int64)
    low = (1 << INDEX_BITS) - 1
    keys = tl.where(live, (lens << INDEX_BITS) | (low - offs).to(tl.int64), -1)
    keys = tl.sort(keys, descending=True)
    tl.store(order_ptr + offs, (low - (keys & low)).to(tl.int32), mask=live)


@triton.jit
def _prefill_tile(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    tile_start,
    seq_len,
    kv_end,
    table,
    k_base,
    v_base,
    scale_log2,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One key tile of online softmax; ``MASKED`` tiles apply the causal and length masks."""
    offs_n = tile_start + tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        valid = offs_n < kv_end
        page = tl.load(table + offs_n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        page = tl.load(table + offs_n // BLOCK_SIZE).to(tl.int64)
    in_page = offs_n % BLOCK_SIZE
    k_ptrs = k_base + (page * stride_kb + in_page * stride_ks)[None, :] + offs_d[:, None]
    v_ptrs = v_base + (page * stride_vb + in_page * stride_vs)[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * scale_log2
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < seq_len)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["num_seqs"])  # one compiled kernel whatever the batch size
def _prefill_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Rows of a program are ``BLOCK_Q`` query tokens x ``GROUP`` query heads of one KV head (row = tok * GROUP + h).

    The grid has ``T // BLOCK_Q + B`` programs on axis 0, an upper bound on the query tiles of all sequences that needs
    no host knowledge of the lengths: sequence ``i`` owns programs ``qsl[i] // BLOCK_Q + i`` onwards (binary search).
    """
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + offs_m // GROUP
    heads = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )
    q = q.to(k_cache_ptr.dtype.element_ty)
    q_pos = context_len + tok

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    # Keys below the tile's first query position are visible to every row: whole tiles there need no mask. The first
    # masked tile's first key is visible to every row too, so no row ever sees an all -inf tile before a finite one.
    first_pos = context_len + q_block * BLOCK_Q
    full_end = (first_pos + 1) // TILE_N * TILE_N
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    for tile_start in range(0, full_end, TILE_N):
        acc, m_i, l_i = _prefill_tile(
            acc, m_i, l_i, q, q_pos, tile_start, seq_len, kv_end, table, k_base, v_base, scale_log2,
            stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_SIZE, TILE_N, False, IEEE,
        )  # fmt: skip
    for tile_start in range(full_end, kv_end, TILE_N):
        acc, m_i, l_i = _prefill_tile(
            acc, m_i, l_i, q, q_pos, tile_start, seq_len, kv_end, table, k_base, v_base, scale_log2,
            stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_SIZE, TILE_N, True, IEEE,
        )  # fmt: skip

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Launch configuration (static: a function of shapes and dtypes only, never of tensor values)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    tile_n: int = 32
    num_warps: int = 4
    # Triton 3.6/3.9 double-buffer the K/V tiles of this loop only from num_stages=5 (at 2-4 the next tile's copy is
    # issued after the current tile's dots, so a program never overlaps its loads with its math).
    num_stages: int = 5
    # Launch order: "lpt" (longest sequences first: the order a caller passes, else one sort launch per call), "seq"
    # (batch order, a sequence's programs side by side), "head" (the original (B, Hk, splits) grid).
    order: str = "lpt"
    # Split-K merge: by the last split to finish (one launch; an atomic counter per (sequence, KV head)) or by a
    # separate reduce kernel.
    fused_reduce: bool = True
    # Split-K only when (batch x KV heads) leaves fewer than min_programs_per_sm programs per SM; it then aims at
    # programs_per_sm, never cutting the table's capacity into splits shorter than min_split_tokens.
    min_programs_per_sm: int = 2
    programs_per_sm: int = 4
    min_split_tokens: int = 128
    max_splits: int = 64


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    tile_n: int
    num_warps: int
    num_stages: int


# The decode variants the benchmark compares (benchmarks/bench_decode_attention.py); DECODE_CONFIG is the default.
# Pick one with PAGEDSERVE_DECODE_VARIANT=<name> or set_decode_variant(name).
DECODE_VARIANTS: dict[str, DecodeConfig] = {
    "baseline": DecodeConfig(tile_n=64, num_warps=4, num_stages=2, order="head", fused_reduce=False),  # the original
    "seq": DecodeConfig(tile_n=64, num_warps=4, num_stages=2, order="seq", fused_reduce=False),
    "lpt": DecodeConfig(tile_n=64, num_warps=4, num_stages=2, order="lpt", fused_reduce=False),
    "fused": DecodeConfig(tile_n=64, num_warps=4, num_stages=2, order="head", fused_reduce=True),
    "db32": DecodeConfig(tile_n=32, num_warps=4, num_stages=5, order="head", fused_reduce=False),
    "db64": DecodeConfig(tile_n=64, num_warps=4, num_stages=5, order="head", fused_reduce=False),
    "lpt-db32": DecodeConfig(tile_n=32, num_warps=4, num_stages=5, order="lpt", fused_reduce=False),
    "lpt-db32-fused": DecodeConfig(tile_n=32, num_warps=4, num_stages=5, order="lpt", fused_reduce=True),
    "seq-db32-fused": DecodeConfig(tile_n=32, num_warps=4, num_stages=5, order="seq", fused_reduce=True),
    "lpt-db64-fused": DecodeConfig(tile_n=64, num_warps=4, num_stages=5, order="lpt", fused_reduce=True),
    # splits also at moderate batches (B=64 -> 3 splits), now that a split costs no extra launch
    "lpt-db32-fused-split": DecodeConfig(tile_n=32, num_warps=4, num_stages=5, order="lpt", fused_reduce=True,
                                         min_programs_per_sm=6, programs_per_sm=8),
}
# Measured on the H100 (benchmarks/bench_decode_attention.py, 2026-11-23): "lpt" with the runner's order is the
# fastest at batch 64-256 (W1 1.07x, W2 1.09x the baseline); when the batch is so small that the context is split,
# "fused" (one launch, last split merges) wins (batch 1: 1.10x).
DEFAULT_DECODE_VARIANT = "lpt"
SPLIT_DECODE_VARIANT = "fused"
DECODE_CONFIG = DECODE_VARIANTS[os.environ.get("PAGEDSERVE_DECODE_VARIANT", DEFAULT_DECODE_VARIANT)]
SPLIT_DECODE_CONFIG = DECODE_VARIANTS[os.environ.get("PAGEDSERVE_DECODE_VARIANT", SPLIT_DECODE_VARIANT)]


def set_decode_variant(name: str) -> DecodeConfig:
    """Make ``DECODE_VARIANTS[name]`` the decode config for every batch size (affects calls made from now on)."""
    global DECODE_CONFIG, SPLIT_DECODE_CONFIG
    DECODE_CONFIG = SPLIT_DECODE_CONFIG = DECODE_VARIANTS[name]
    return DECODE_CONFIG


# (minimum average query length T / B, config): the first whose threshold the batch meets wins.
PREFILL_CONFIGS: list[tuple[float, PrefillConfig]] = [
    (64.0, PrefillConfig(block_m=128, tile_n=64, num_warps=8, num_stages=2)),
    (8.0, PrefillConfig(block_m=64, tile_n=64, num_warps=4, num_stages=2)),
    (0.0, PrefillConfig(block_m=16, tile_n=64, num_warps=4, num_stages=2)),
]


def decode_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int, sms: int,
                      config: DecodeConfig = DECODE_CONFIG) -> int:  # fmt: skip
    """Split-K factor from static shapes: enough programs to fill the GPU, never splits shorter than a minimum."""
    programs = batch * num_kv_heads
    if programs >= config.min_programs_per_sm * sms:
        return 1
    wanted = -(-config.programs_per_sm * sms // programs)
    by_length = max(1, (max_blocks * block_size) // config.min_split_tokens)
    return max(1, min(wanted, by_length, config.max_splits))


def _pick_prefill_config(num_tokens: int, num_seqs: int) -> PrefillConfig:
    avg = num_tokens / max(num_seqs, 1)
    for threshold, config in PREFILL_CONFIGS:
        if avg >= threshold:
            return config
    return PREFILL_CONFIGS[-1][1]


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


def _check(q, k_cache, v_cache, block_tables, out) -> torch.Tensor:
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


_ORDER_MODES = {"head": ORDER_HEAD_MAJOR, "seq": ORDER_SEQ_MAJOR, "lpt": ORDER_PERMUTED}
# Split-K arrival counters for the fused merge, per device; all zero between launches (the last arriver resets its
# own). Grown outside graph capture only; superseded buffers stay alive because captured graphs may point at them.
_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED_COUNTERS: list[torch.Tensor] = []


def _split_counters(device: torch.device, size: int) -> torch.Tensor | None:
    """A zeroed int32 buffer of at least ``size`` counters, or None while a CUDA graph is being captured and no such
    buffer exists yet (zeros made inside a capture would only exist on replay): the caller then reduces separately."""
    buf = _SPLIT_COUNTERS.get(device)
    if buf is not None and buf.numel() >= size:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if buf is not None:
        _RETIRED_COUNTERS.append(buf)
    buf = torch.zeros(max(size, 8192), dtype=torch.int32, device=device)
    _SPLIT_COUNTERS[device] = buf
    return buf


def reserve_decode_workspace(max_seqs: int, num_kv_heads: int, device: torch.device | str) -> None:
    """Allocate the split-K counters up front (call outside graph capture), so captured graphs use the fused merge."""
    _split_counters(torch.device(device), max_seqs * num_kv_heads)


def decode_order(seq_lens: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """On the device, one launch: sequence indices by decreasing length, ties by increasing index (the launch order
    of ``order="lpt"``). Same result as :func:`decode_order_host`. Graph safe; ``out`` may be a persistent buffer."""
    batch = seq_lens.shape[0]
    if batch > 1 << _ORDER_INDEX_BITS:
        raise ValueError(f"decode_order handles at most {1 << _ORDER_INDEX_BITS} sequences, got {batch}")
    if out is None:
        out = torch.empty(batch, dtype=torch.int32, device=seq_lens.device)
    if batch:
        block = max(16, triton.next_power_of_2(batch))
        _decode_order_kernel[(1,)](out, seq_lens, batch, BLOCK=block, INDEX_BITS=_ORDER_INDEX_BITS,
                                   num_warps=4 if block <= 1024 else 8)  # fmt: skip
    return out


def decode_order_host(seq_lens: np.ndarray) -> np.ndarray:
    """The same permutation as :func:`decode_order`, on the host (for a runner that stages it with the step inputs)."""
    return np.argsort(-np.asarray(seq_lens, dtype=np.int64), kind="stable").astype(np.int32)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    seq_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton decode attention: every sequence has exactly one query row (or none).

    CUDA-graph safe: no host syncs; the grid is ``B x Hk x num_splits`` programs with ``num_splits`` from static shapes;
    the split-K scratch is allocated from static shapes (inside a graph capture it lives in the graph's pool). Sequences
    with ``seq_len == 0`` (graph padding) get zero output rows.

    ``seq_order`` (``[B]`` int32, a permutation of ``0..B-1``, e.g. :func:`decode_order_host` of the lengths staged
    each step) is the launch order when ``config.order == "lpt"``; without it that order is computed on the device by
    one extra launch (:func:`decode_order`). Other orders ignore it.
    """
    out = _check(q, k_cache, v_cache, block_tables, out)
    batch = seq_lens.shape[0]
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    if config is None:
        config = DECODE_CONFIG
        sms = num_sms(q.device.index if q.is_cuda else None)
        if num_splits is None and decode_num_splits(batch, num_kv_heads, block_tables.shape[1], block_size, sms,
                                                    config) > 1:
            config = SPLIT_DECODE_CONFIG
    if num_splits is None:
        sms = num_sms(q.device.index if q.is_cuda else None)
        num_splits = decode_num_splits(batch, num_kv_heads, block_tables.shape[1], block_size, sms, config)
    if batch == 0:
        return out
    order = _ORDER_MODES[config.order]
    if order == ORDER_PERMUTED:
        if seq_order is None:
            seq_order = decode_order(seq_lens)
        elif seq_order.shape != (batch,) or seq_order.dtype != torch.int32:
            raise ValueError(f"seq_order must be int32 of shape ({batch},), got {seq_order.dtype} {tuple(seq_order.shape)}")
    else:
        seq_order = seq_lens  # never read
    counters = None
    if num_splits > 1:
        part_out = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        if config.fused_reduce:
            counters = _split_counters(q.device, batch * num_kv_heads)
    else:
        part_out = part_lse = out  # never touched
    fused = counters is not None
    group_pad = triton.next_power_of_2(group)
    splits_pad = triton.next_power_of_2(num_splits)
    grid = (batch, num_kv_heads, num_splits) if order == ORDER_HEAD_MAJOR else (batch * num_kv_heads * num_splits,)
    _decode_kernel[grid](
        out, part_out, part_lse, counters if fused else seq_lens, seq_order,
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale * _LOG2E, num_kv_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        BLOCK_H=max(16, group_pad),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE_N=config.tile_n,
        NUM_SPLITS=num_splits,
        ORDER=order,
        FUSED_REDUCE=fused,
        GROUP_PAD=group_pad,
        SPLITS_PAD=splits_pad,
        SPLIT_CHUNK=max(1, min(splits_pad, 32 // group_pad)),
        IEEE=k_cache.dtype == torch.float32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    if num_splits > 1 and not fused:
        _decode_reduce_kernel[(batch, num_q_heads)](
            out, part_out, part_lse, seq_lens, query_start_loc, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            TILE_N=config.tile_n,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=splits_pad,
            num_warps=4,
        )  # fmt: skip
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Triton varlen causal attention over the paged cache, for any mix of prefill chunks and decodes.

    The grid is sized from ``T`` and ``B`` (shapes), so it needs no host copy of the lengths either.
    """
    out = _check(q, k_cache, v_cache, block_tables, out)
    num_tokens, num_q_heads, head_dim = q.shape
    batch = seq_lens.shape[0]
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    if num_tokens == 0 or batch == 0:
        return out
    config = config or _pick_prefill_config(num_tokens, batch)
    block_m = max(config.block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (num_tokens // block_q + batch, num_kv_heads)
    _prefill_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale * _LOG2E, batch,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE_N=config.tile_n,
        IEEE=k_cache.dtype == torch.float32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
    decode_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal paged attention (see the module docstring); ``out`` may be a persistent buffer (CUDA graphs).

    On CUDA: the split-K decode kernel when ``max_query_len == 1`` (every sequence has at most one query row; the
    CUDA-graph path; ``decode_order`` is its optional launch order, see :func:`paged_decode_attention`), the varlen
    prefill kernel otherwise (``max_query_len=None`` is always safe). Shapes the kernels do not handle (head dim not a
    power of two >= 16) fall back to the reference. ``backend="torch"`` (or ``PAGEDSERVE_ATTENTION_BACKEND=torch``)
    forces the reference, which syncs and is not graph-safe.
    """
    if backend != "torch" and use_triton(q, attention=True) and triton_supports(q, k_cache):
        if max_query_len == 1:
            return paged_decode_attention(
                q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out=out, seq_order=decode_order
            )
        return paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out=out)
    result = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    if out is None:
        return result
    out.copy_(result)
    return out
