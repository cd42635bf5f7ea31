"""Decode attention over the paged KV cache: every sequence has one query row (or none this step), or, for the
verify step of speculative decoding, up to ``queries`` rows (its last token and its drafts; the ``QUERIES`` constexpr).

One program per (sequence, KV head, split) serves the KV head's whole query group (padded to 16 rows for
``tl.dot``); with several queries the tile's rows are the (query, head) pairs, each row under its own causal limit.
Split-K (the context cut into ``num_splits`` shares) only when the batch leaves the GPU short of programs; the splits
are merged either by the last split to finish (one launch, ``fused_reduce``) or by a separate reduce kernel. The
launch order of the programs is a parameter: with mixed context lengths, longest sequences first ("lpt") keeps long
programs out of the tail. Layout and shared pieces: kernels/attention_common.py.

The engine uses :data:`DECODE_CONFIG` and, when the context is split, :data:`SPLIT_DECODE_CONFIG` (an fp8 cache:
:data:`FP8_DECODE_CONFIG` / :data:`FP8_SPLIT_DECODE_CONFIG`); the other
configurations benchmarks/bench_decode_attention.py compares live in benchmarks/decode_attention_variants.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from kernels.attention_common import (
    attend, attend_kv_tile, check_attention_args, fold_kv_tile, fp8_read_flags, gather_kv, head_dim_block,
    is_fp8_cache, kv_compute_dtype, load_kv_tile, queries_to_fp16, score_params, visible_keys,
)
from kernels.backend import num_sms
from kernels.fp8_decode_gluon import gluon_decode_supported, gluon_fp8_decode
from kernels.pdl import launch_options, release_early, use_pdl, wait_then_release


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    queries: int = 1,
    sliding_window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Plain-torch reference for the sequences with 1 to ``queries`` query rows (a decode, or a speculative verify:
    the last token and its drafts), in one padded batch; rows of other sequences in ``out`` are left as they are.
    Reads the lengths on the host (a sync): for CPU and tests. ``sliding_window``/``softcap``/``alibi_slopes`` and
    the fp8 cache's ``k_scale``/``v_scale``: see kernels/attention_common.py."""
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    q_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
    decode_rows = [i for i, n in enumerate(q_lens) if 1 <= n <= queries]
    if not decode_rows:
        return out
    width = max(q_lens[i] for i in decode_rows)
    if len(decode_rows) == len(q_lens) and all(n == width for n in q_lens):
        # Every sequence has the same row count (a decode or a full verify step): plain reshapes, no gathers.
        lens, table = seq_lens, block_tables
        num_queries = torch.full((len(q_lens), 1), width, device=q.device)
        token_rows = slice(starts[0], starts[-1])
        queries_in = q[token_rows].reshape(len(q_lens), width, *q.shape[1:])
    else:
        rows = torch.tensor(decode_rows, device=q.device)
        lens, table = seq_lens.index_select(0, rows), block_tables.index_select(0, rows)
        first = query_start_loc[:-1].index_select(0, rows).long()
        num_queries = torch.tensor([q_lens[i] for i in decode_rows], device=q.device)[:, None]
        offs = torch.arange(width, device=q.device)
        live = offs[None, :] < num_queries  # [B, W]: padded rows are computed and dropped
        token_rows = torch.where(live, first[:, None] + offs[None, :], first[:, None])
        queries_in = q[token_rows]
    max_len = int(lens.max())
    keys, values = gather_kv(k_cache, v_cache, table, max_len, k_scale=k_scale, v_scale=v_scale, dtype=q.dtype)
    query_pos = lens.long()[:, None] - num_queries + torch.arange(width, device=q.device)[None, :]  # [B, W]
    mask = visible_keys(query_pos, max_len, sliding_window)  # [B, W, S]
    result = attend(queries_in, keys, values, mask, scale, softcap=softcap, alibi_slopes=alibi_slopes,
                    query_pos=query_pos)  # [B, W, Hq, D]
    if isinstance(token_rows, slice):
        out[token_rows] = result.reshape(-1, *q.shape[1:])
    else:
        out[token_rows[live]] = result[live]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------

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
    qk_scale,  # the fp8 cache's k_scale folded in
    cap_log2,
    slopes_ptr,  # [Hq] float32 ALiBi slopes (ALIBI only)
    sliding_window,  # 0: none; else only the last sliding_window positions are visible
    v_scale,  # the fp8 cache's value scale (KV_FP8 only)
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
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    ORDER: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    WINDOW: tl.constexpr,
    KV_FP8: tl.constexpr,
    FP8_F16_DOTS: tl.constexpr,  # KV_FP8 with fp16/bf16 queries: dots in fp16 (see queries_to_fp16)
    V_PAIRS: tl.constexpr,  # fp8 V tiles read as uint16 pairs (see e4m3_pairs_to_fp16)
    PAIRS_ASM: tl.constexpr,  # ... converted by the PTX instruction (CUDA), else byte by byte
    SPLIT_V: tl.constexpr,  # ... and p @ v in two halves of the keys (see split_pv)
    QUERIES: tl.constexpr,  # query rows per sequence at most (1: decode; 1 + k: a speculative verify)
    USE_PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
    PRE_WAIT_KV: tl.constexpr = False,  # one query row, a 16-bit cache: the split's first tile read before the wait
    EARLY_RELEASE: tl.constexpr = False,  # the next PDL kernel may launch before this one waits (RELEASE_BEFORE_WAIT)
):
    release_early(USE_PDL and EARLY_RELEASE)
    if not PRE_WAIT_KV:
        wait_then_release(USE_PDL, EARLY_RELEASE)
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
    if QUERIES == 1:
        if tl.load(query_start_loc_ptr + seq + 1) == q_row:
            return  # a sequence with no query row this step
        q_len = 1
    else:
        q_len = tl.minimum(tl.load(query_start_loc_ptr + seq + 1) - q_row, QUERIES)
        if q_len <= 0:
            return  # a sequence with no query row this step (a verify graph's padding)
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

    table = block_tables_ptr + seq * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    offs_d = tl.arange(0, BLOCK_D)
    # Sliding window: keys before win_start (the first row's window) are invisible; tiles wholly before it are skipped.
    win_start = tl.maximum(seq_len - q_len + 1 - sliding_window, 0) if WINDOW else 0
    first_tile = tl.maximum(start, win_start // TILE_N * TILE_N)
    if PRE_WAIT_KV:
        # Everything above read step inputs only; so do the block table and the cached keys and values of every
        # position but the newest, which the kernel this one waits on (the qkv projection) is writing: the split's
        # first tile of those is loaded now, into registers, while that kernel runs, and the newest row after it.
        pre_n = first_tile + tl.arange(0, TILE_N)
        pre_page = tl.load(table + pre_n // BLOCK_SIZE, mask=pre_n < end, other=0).to(tl.int64)
        pre_slot = pre_n % BLOCK_SIZE
        dim_ok = offs_d < HEAD_DIM
        k_ptrs = k_base + (pre_page * stride_kb + pre_slot * stride_ks)[None, :] + offs_d[:, None]
        v_ptrs = v_base + (pre_page * stride_vb + pre_slot * stride_vs)[:, None] + offs_d[None, :]
        older = pre_n < tl.minimum(end, seq_len - 1)
        k_pre = load_kv_tile(k_ptrs, older[None, :], dim_ok[:, None], True, BLOCK_D != HEAD_DIM)
        v_pre = load_kv_tile(v_ptrs, older[:, None], dim_ok[None, :], True, BLOCK_D != HEAD_DIM)
        wait_then_release(USE_PDL, EARLY_RELEASE)
        newest = (pre_n == seq_len - 1) & (pre_n < end)
        k_pre = tl.where(newest[None, :], load_kv_tile(k_ptrs, newest[None, :], dim_ok[:, None], True,
                                                       BLOCK_D != HEAD_DIM), k_pre)  # fmt: skip
        v_pre = tl.where(newest[:, None], load_kv_tile(v_ptrs, newest[:, None], dim_ok[None, :], True,
                                                       BLOCK_D != HEAD_DIM), v_pre)  # fmt: skip

    offs_h = tl.arange(0, BLOCK_H)
    if QUERIES == 1:
        head_mask = offs_h < GROUP
        heads = kv_head * GROUP + offs_h
        tile_mask = head_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=tile_mask,
                    other=0.0)  # fmt: skip
    else:
        # Row r of the tile: query token r // GROUP of the sequence's q_len (the last ones of its context), query
        # head kv_head * GROUP + r % GROUP.
        query = offs_h // GROUP
        head_mask = query < q_len
        heads = kv_head * GROUP + (offs_h - query * GROUP)
        tile_mask = head_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(q_ptr + (q_row + query)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=tile_mask, other=0.0)  # fmt: skip
    if FP8_F16_DOTS:
        q, qk_scale = queries_to_fp16(q, qk_scale)  # the fp8 tiles are converted to fp16
    elif not KV_FP8:
        q = q.to(k_cache_ptr.dtype.element_ty)  # an fp8 cache's tiles are upcast to q's dtype instead

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    if QUERIES == 1:
        q_pos = tl.zeros([BLOCK_H], dtype=tl.int32) + seq_len - 1
    else:
        q_pos = seq_len - q_len + query  # each row's causal limit
    slopes = tl.load(slopes_ptr + heads, mask=head_mask, other=0.0) if ALIBI else q_pos
    if PRE_WAIT_KV:
        if first_tile < end:
            acc, m_i, l_i = fold_kv_tile(acc, m_i, l_i, q, k_pre, v_pre, q_pos, pre_n, end, qk_scale, cap_log2,
                                         slopes, sliding_window, True, IEEE, SOFTCAP, ALIBI, WINDOW)  # fmt: skip
        first_tile += TILE_N
    for tile_start in range(first_tile, end, TILE_N):
        # Every decode tile is masked: the split's end, the window's lower edge in its first tile, and with several
        # queries each row's causal limit (a split may lie wholly after the earliest rows': EMPTY_ROWS).
        acc, m_i, l_i = attend_kv_tile(
            acc, m_i, l_i, q, q_pos, tile_start, end, table, k_base, v_base, qk_scale, cap_log2, slopes,
            sliding_window, stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_D, BLOCK_SIZE, TILE_N, True,
            IEEE, SOFTCAP, ALIBI, WINDOW, V_PAIRS, PAIRS_ASM, QUERIES > 1, SPLIT_V,
        )  # fmt: skip

    safe_l = tl.where(l_i > 0.0, l_i, 1.0)  # seq_len == 0 (graph padding) gives zeros, not NaN
    out = acc / safe_l[:, None]
    if KV_FP8:
        out = out * v_scale
    num_q_heads = num_kv_heads * GROUP
    if QUERIES == 1:
        out_ptrs = out_ptr + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        part = (seq * num_q_heads + heads) * NUM_SPLITS + split  # [BLOCK_H]
    else:
        out_ptrs = out_ptr + (q_row + query)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        part = ((seq * QUERIES + query) * num_q_heads + heads) * NUM_SPLITS + split
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=tile_mask)
    elif not FUSED_REDUCE:
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=tile_mask)
        tl.store(part_lse_ptr + part, m_i + tl.log2(safe_l), mask=head_mask)  # -inf: no key of this split visible
    elif num_active <= 1:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=tile_mask)  # nothing to merge
    else:
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=tile_mask)
        tl.store(part_lse_ptr + part, m_i + tl.log2(safe_l), mask=head_mask)
        # The last split of this (sequence, KV head) to finish merges all of them ("last arriver reduces"): every
        # thread's partial stores are ordered before the counter increment by the CTA barrier, and the increment
        # is a gpu-scope release/acquire, so the last arriver sees every partial; it reads them through L2 (.cg).
        tl.debug_barrier()
        counter = counter_ptr + seq * num_kv_heads + kv_head
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if ticket == num_active - 1:
            tl.store(counter, 0)  # ready for the next launch (stream order puts it before the next kernel)
            if QUERIES == 1:
                offs_g = tl.arange(0, GROUP_PAD)
                merge_mask = offs_g < GROUP
                merge_heads = kv_head * GROUP + offs_g
                merge_base = (seq * num_q_heads + merge_heads) * NUM_SPLITS  # [GROUP_PAD]
                merge_rows = out_ptr + q_row * stride_ot  # the sequence's one output row
                merge_out = merge_heads * stride_oh
            else:
                offs_g = tl.arange(0, GROUP_PAD)  # GROUP_PAD: QUERIES * GROUP rounded up to a power of two
                merge_query = offs_g // GROUP
                merge_mask = merge_query < q_len
                merge_heads = kv_head * GROUP + (offs_g - merge_query * GROUP)
                merge_base = ((seq * QUERIES + merge_query) * num_q_heads + merge_heads) * NUM_SPLITS
                merge_rows = out_ptr
                merge_out = (q_row + merge_query) * stride_ot + merge_heads * stride_oh
            _merge_splits(merge_rows, part_out_ptr, part_lse_ptr, merge_base, merge_mask, merge_out, num_active,
                          GROUP_PAD, HEAD_DIM, BLOCK_D, SPLITS_PAD, SPLIT_CHUNK)  # fmt: skip


@triton.jit
def _merge_splits(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    base,  # [ROWS] the part index of each row's split 0
    row_mask,  # [ROWS] the rows to merge (a real (query, head) pair)
    out_offs,  # [ROWS] each row's offset from out_ptr
    num_active,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    """Weights ``2^(lse_s - max lse)`` over the ``num_active >= 2`` splits of one KV head's (query, head) rows, then
    the weighted sum of the split outputs ``SPLIT_CHUNK`` splits at a time (keeps the [rows, chunk, D] tile small).
    The first chunk's partials are requested with the lse of every split: one trip through L2 where a merge of at
    most ``SPLIT_CHUNK`` splits (a batch-1 decode's) used to take two."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(
        part_lse_ptr + base[:, None] + offs_s[None, :],
        mask=row_mask[:, None] & (offs_s < num_active)[None, :],
        other=float("-inf"),
        cache_modifier=".cg",
    )
    lse_c, parts = _split_chunk(part_out_ptr, part_lse_ptr, base, row_mask, 0, num_active, offs_d, d_mask, HEAD_DIM,
                                SPLIT_CHUNK)  # fmt: skip
    # Finite for every real row: the split holding the row's own position sees that key (a split of keys all
    # after a row's causal limit has lse -inf, weight 0).
    lse_max = tl.where(row_mask, tl.max(lse, 1), 0.0)
    total = tl.sum(tl.exp2(lse - lse_max[:, None]), 1)
    total = tl.where(row_mask, total, 1.0)
    acc = tl.sum(parts * tl.exp2(lse_c - lse_max[:, None])[:, :, None], 1)  # weights 0 for masked splits
    for chunk_start in range(SPLIT_CHUNK, num_active, SPLIT_CHUNK):
        lse_c, parts = _split_chunk(part_out_ptr, part_lse_ptr, base, row_mask, chunk_start, num_active, offs_d,
                                    d_mask, HEAD_DIM, SPLIT_CHUNK)  # fmt: skip
        acc += tl.sum(parts * tl.exp2(lse_c - lse_max[:, None])[:, :, None], 1)
    out = acc / total[:, None]
    tl.store(
        out_ptr + out_offs[:, None] + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _split_chunk(part_out_ptr, part_lse_ptr, base, row_mask, chunk_start, num_active, offs_d, d_mask,
                 HEAD_DIM: tl.constexpr, SPLIT_CHUNK: tl.constexpr):  # fmt: skip
    """The lse ``[rows, SPLIT_CHUNK]`` and outputs ``[rows, SPLIT_CHUNK, D]`` of splits ``chunk_start...`` (-inf and
    zeros past ``num_active``), read through L2 (the other splits' programs wrote them)."""
    offs_c = chunk_start + tl.arange(0, SPLIT_CHUNK)
    mask = row_mask[:, None] & (offs_c < num_active)[None, :]  # [ROWS, SPLIT_CHUNK]
    rows = base[:, None] + offs_c[None, :]
    lse_c = tl.load(part_lse_ptr + rows, mask=mask, other=float("-inf"), cache_modifier=".cg")
    parts = tl.load(
        part_out_ptr + rows[:, :, None] * HEAD_DIM + offs_d[None, None, :],
        mask=mask[:, :, None] & d_mask[None, None, :],
        other=0.0,
        cache_modifier=".cg",
    )
    return lse_c, parts


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
    BLOCK_D: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    QUERIES: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Grid ``(B, Hq)``, with several queries ``(B, Hq, QUERIES)``: one (sequence, head[, query]) row's splits."""
    wait_then_release(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_loc_ptr + seq)
    if QUERIES == 1:
        if tl.load(query_start_loc_ptr + seq + 1) == q_row:
            return
        part_row = seq
    else:
        query = tl.program_id(2)
        if query >= tl.minimum(tl.load(query_start_loc_ptr + seq + 1) - q_row, QUERIES):
            return
        part_row = seq * QUERIES + query
        q_row += query
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), TILE_N) * TILE_N
    num_active = tl.cdiv(seq_len, tl.maximum(split_len, 1))  # 0 when seq_len == 0
    offs_s = tl.arange(0, SPLITS_PAD)
    active = offs_s < num_active
    part = (part_row * tl.num_programs(1) + head) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + part, mask=active, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(num_active > 0, lse_max, 0.0)
    weight = tl.exp2(lse - lse_max)  # 0 for inactive splits (and for splits wholly after this row's position)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=active[:, None] & d_mask[None, :],
                    other=0.0)  # fmt: skip
    total = tl.maximum(tl.sum(weight, 0), 1e-30)
    out = tl.sum(parts * weight[:, None], 0) / total
    tl.store(out_ptr + q_row * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


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
    # How an fp8 cache is read (kernels/attention_common.py fp8_read_flags): "f16-vpairs" (fp16 dots, V converted as
    # packed pairs before its transpose), "f16-vsplit" (the same, p @ v in two halves of the keys), "f16" (fp16 dots,
    # plain casts), "upcast" (tiles cast to q's dtype), "gluon" (unsplit decodes the Gluon kernel serves run there,
    # kernels/fp8_decode_gluon.py; the rest as "f16-vsplit" with this config).
    fp8_path: str = "f16-vpairs"
    # Registers per thread the compiler may use (Triton's maxnreg; None: its own choice). Programs per SM are the
    # fewest that registers and shared memory allow: 128 lets 4 programs of 4 warps share an SM.
    max_registers: int | None = None


# Measured on the H100 (benchmarks/bench_decode_attention.py; numbers in benchmarks/decode_attention_variants.py):
# longest-first order with the runner's permutation is the fastest at batch 64-256; when the batch is so small that
# the context is split, one launch whose last split merges wins.
DECODE_CONFIG = DecodeConfig(tile_n=64, num_warps=4, num_stages=2, order="lpt", fused_reduce=False)
SPLIT_DECODE_CONFIG = DecodeConfig(tile_n=64, num_warps=4, num_stages=2, order="head", fused_reduce=True)
# Head dims above 128 (Gemma's 256): a key tile is twice the bytes per key. Measured on the H200 (2026-12-02,
# benchmarks/bench_decode_attention.py --cases g2 --sweep: gemma-2-9b shapes, B=224, soft-cap): 32 keys x 2 warps x 2
# stages 426 us per layer (4.41 TB/s of K+V reads, L2 hits included) against 443 us for DECODE_CONFIG.
WIDE_DECODE_CONFIG = DecodeConfig(tile_n=32, num_warps=2, num_stages=2, order="lpt", fused_reduce=False)
# An fp8 cache has its own configs: its tiles are half the bytes and its loop does different work (conversions), so
# the best tile / warps / stages differ. Measured on the H200 (2026-12-02, eighth session,
# `python benchmarks/bench_decode_attention.py --kv-cache-dtype fp8 --sweep`): 128 keys x 4 warps x 3 stages with the
# split-V read path (p @ v over even keys, then odd ones: half the fp16 V tile in shared memory) and 128 registers per
# thread (4 programs per SM instead of 3), 197.0 / 192.2 us per W1 / W2 layer against 215.6 / 209.8 for the
# f16-vpairs 128/4/2 before it and 257.1 / 250.5 for the bf16 cache (1.30x). Since the fourteenth session the
# unsplit decodes it serves run the Gluon kernel (kernels/fp8_decode_gluon.py): 152.3 us per W2 layer against this
# Triton config's 192.4, W2-kvfp8 16,652 tok/s against 14,567; the rest (splits, verify rows, query groups over 8,
# soft-capping, head dim 256) run this config's Triton kernel on the "f16-vsplit" path.
FP8_DECODE_CONFIG = DecodeConfig(tile_n=128, num_warps=4, num_stages=3, order="lpt", fused_reduce=False,
                                 fp8_path="gluon", max_registers=128)  # fmt: skip
FP8_SPLIT_DECODE_CONFIG = DecodeConfig(tile_n=64, num_warps=4, num_stages=2, order="head", fused_reduce=True,
                                       fp8_path="f16-vpairs")  # fmt: skip


def set_decode_configs(config: DecodeConfig, split_config: DecodeConfig | None = None, *,
                       wide_config: DecodeConfig | None = None, fp8_config: DecodeConfig | None = None,
                       fp8_split_config: DecodeConfig | None = None) -> None:  # fmt: skip
    """Replace the default configs (benchmarks and experiments; affects launches made, and graphs captured, from now
    on). ``split_config`` and ``wide_config`` default to ``config``; the fp8-cache configs default to the same two (a
    variant set for an experiment applies to both cache dtypes unless fp8 ones are given)."""
    global DECODE_CONFIG, SPLIT_DECODE_CONFIG, WIDE_DECODE_CONFIG, FP8_DECODE_CONFIG, FP8_SPLIT_DECODE_CONFIG
    DECODE_CONFIG = config
    SPLIT_DECODE_CONFIG = split_config or config
    WIDE_DECODE_CONFIG = wide_config or config
    FP8_DECODE_CONFIG = fp8_config or DECODE_CONFIG
    FP8_SPLIT_DECODE_CONFIG = fp8_split_config or fp8_config or SPLIT_DECODE_CONFIG


def default_decode_configs(fp8_cache: bool, head_dim: int = 128) -> tuple[DecodeConfig, DecodeConfig]:
    """(unsplit, split) default configs for a cache dtype and head dim."""
    if fp8_cache:
        return FP8_DECODE_CONFIG, FP8_SPLIT_DECODE_CONFIG
    return (DECODE_CONFIG if head_dim <= 128 else WIDE_DECODE_CONFIG), SPLIT_DECODE_CONFIG


# The multi-query tile's rows (queries x group, padded to a power of two) at most: beyond it the program's q and
# accumulator tiles outgrow the registers and the varlen prefill kernel serves the step instead.
MAX_MULTI_QUERY_ROWS = 64


def multi_query_decode_supported(queries: int, group: int) -> bool:
    """Whether the decode kernel takes ``queries`` query rows per sequence for a query group of ``group`` heads."""
    return queries >= 1 and triton.next_power_of_2(queries * group) <= MAX_MULTI_QUERY_ROWS


def decode_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int, sms: int,
                      config: DecodeConfig | None = None) -> int:  # fmt: skip
    """Split-K factor from static shapes: enough programs to fill the GPU, never splits shorter than a minimum.
    ``config`` defaults to :data:`DECODE_CONFIG`."""
    config = config or DECODE_CONFIG
    programs = batch * num_kv_heads
    if programs >= config.min_programs_per_sm * sms:
        return 1
    wanted = -(-config.programs_per_sm * sms // programs)
    by_length = max(1, (max_blocks * block_size) // config.min_split_tokens)
    return max(1, min(wanted, by_length, config.max_splits))


# Split decodes of one query row over a 16-bit cache load their first tile of cached keys and values (all but the
# newest row, which the qkv projection before them writes) before their PDL wait: a batch-1 step's attention is a few
# dependent memory trips long, and these are the ones that do not depend on that kernel.
PRE_WAIT_KV = True

# Let the kernel after decode attention (o_proj) launch before attention waits on the qkv projection, so its
# programs load their weight while qkv still runs. Off: the nineteenth session measured +3% a W3-fp8 step with
# o_proj's weight preloaded into registers (its programs took the SMs qkv's needed); a candidate again for an
# o_proj that stages its weight in shared memory (``benchmarks/fp8_gemv_variants.py``: ``attn-early``).
RELEASE_BEFORE_WAIT = False

# The fused merge reads the splits' partials in chunks of MERGE_CHUNK (rows x splits): a [rows, chunk, head dim]
# fp32 tile. 64 holds a batch-1 decode's query group of 4 over up to 16 splits (1,024 keys of 64) in one chunk,
# 64 registers a thread at 4 warps, so its merge is one trip through L2 (32 took two above 512 keys).
MERGE_CHUNK = 64

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
    sliding_window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    queries: int = 1,
) -> torch.Tensor:
    """Triton decode attention: every sequence has at most ``queries`` query rows (one for a decode; 1 + k for a
    speculative verify: the last token and its drafts), the last positions of its context, each row under its own
    causal limit; none is allowed too. ``sliding_window``, ``softcap``, ``alibi_slopes`` and an fp8 cache's
    ``k_scale``/``v_scale`` as in the reference (kernels/attention_common.py). With several queries the program's
    tile packs the (query, head) pairs of a KV head in its rows (``queries * group`` rows, padded to a power of two),
    so the K/V tiles are still read once per KV head and split.

    CUDA-graph safe: no host syncs; the grid is ``B x Hk x num_splits`` programs with ``num_splits`` from static shapes;
    the split-K scratch is allocated from static shapes (inside a graph capture it lives in the graph's pool). Sequences
    with ``seq_len == 0`` (graph padding) get zero output rows.

    ``seq_order`` (``[B]`` int32, a permutation of ``0..B-1``, e.g. :func:`decode_order_host` of the lengths staged
    each step) is the launch order when ``config.order == "lpt"``; without it that order is computed on the device by
    one extra launch (:func:`decode_order`). Other orders ignore it.
    """
    out = check_attention_args(q, k_cache, v_cache, block_tables, out)
    if queries < 1:
        raise ValueError(f"queries must be >= 1, got {queries}")
    batch = seq_lens.shape[0]
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    if config is None:
        config, split_config = default_decode_configs(is_fp8_cache(k_cache), head_dim)
        sms = num_sms(q.device.index if q.is_cuda else None)
        if num_splits is None and decode_num_splits(batch, num_kv_heads, block_tables.shape[1], block_size, sms,
                                                    config) > 1:
            config = split_config
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
    if config.fp8_path == "gluon" and num_splits == 1 and gluon_decode_supported(
            q, k_cache, queries=queries, softcap=softcap, alibi_slopes=alibi_slopes, sliding_window=sliding_window):
        order_arg = seq_order if order == ORDER_PERMUTED else decode_order(seq_lens)
        return gluon_fp8_decode(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out, order_arg,
                                k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    counters = None
    if num_splits > 1:
        part_out = torch.empty((batch * queries, num_q_heads, num_splits, head_dim), dtype=torch.float32,
                               device=q.device)  # fmt: skip
        part_lse = torch.empty((batch * queries, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        if config.fused_reduce:
            counters = _split_counters(q.device, batch * num_kv_heads)
    else:
        part_out = part_lse = out  # never touched
    fused = counters is not None
    kv_fp8 = is_fp8_cache(k_cache)
    group_pad = triton.next_power_of_2(group)
    rows_pad = group_pad if queries == 1 else triton.next_power_of_2(queries * group)  # the fused merge's rows
    splits_pad = triton.next_power_of_2(num_splits)
    grid = (batch, num_kv_heads, num_splits) if order == ORDER_HEAD_MAJOR else (batch * num_kv_heads * num_splits,)
    _decode_kernel[grid](
        out, part_out, part_lse, counters if fused else seq_lens, seq_order,
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        *score_params(scale * (k_scale if kv_fp8 else 1.0), softcap), alibi_slopes if alibi_slopes is not None else q,
        sliding_window, v_scale if kv_fp8 else 1.0, num_kv_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        BLOCK_H=max(16, rows_pad),
        HEAD_DIM=head_dim,
        BLOCK_D=head_dim_block(head_dim),
        BLOCK_SIZE=block_size,
        TILE_N=config.tile_n,
        NUM_SPLITS=num_splits,
        ORDER=order,
        FUSED_REDUCE=fused,
        GROUP_PAD=rows_pad,
        SPLITS_PAD=splits_pad,
        SPLIT_CHUNK=max(1, min(splits_pad, MERGE_CHUNK // rows_pad)),
        IEEE=kv_compute_dtype(q, k_cache) == torch.float32,
        SOFTCAP=softcap > 0,
        ALIBI=alibi_slopes is not None,
        WINDOW=sliding_window > 0,
        KV_FP8=kv_fp8,
        **fp8_read_flags(q, k_cache, v_cache, config.fp8_path),
        QUERIES=queries,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **({"maxnreg": config.max_registers} if config.max_registers and q.is_cuda else {}),
        **launch_options(use_pdl(q)),
        PRE_WAIT_KV=PRE_WAIT_KV and queries == 1 and num_splits > 1 and not kv_fp8,
        EARLY_RELEASE=RELEASE_BEFORE_WAIT,
    )  # fmt: skip
    if num_splits > 1 and not fused:
        _decode_reduce_kernel[(batch, num_q_heads) if queries == 1 else (batch, num_q_heads, queries)](
            out, part_out, part_lse, seq_lens, query_start_loc, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=head_dim_block(head_dim),
            TILE_N=config.tile_n,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=splits_pad,
            QUERIES=queries,
            num_warps=4,
            **launch_options(use_pdl(q)),
        )  # fmt: skip
    return out
