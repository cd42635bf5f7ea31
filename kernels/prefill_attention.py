"""Prefill attention over the paged KV cache: varlen causal attention for any mix of prefill chunks and decodes.

Programs over (query tile, KV head) with GQA packing (rows = query tokens x the KV head's query heads); the grid is
sized from ``T`` and ``B`` (shapes), with a binary search for each program's sequence, so it needs no host copy of
the lengths. Key tiles below the diagonal run unmasked, tiles at the diagonal masked. Layout and shared pieces:
kernels/attention_common.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.attention_common import (
    attend, attend_kv_tile, check_attention_args, gather_kv, head_dim_block, is_fp8_cache, kv_compute_dtype,
    fp8_read_flags, queries_to_fp16, score_params, visible_keys,
)


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    min_query_len: int = 1,
    sliding_window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Plain-torch reference, one sequence at a time under a causal mask (an fp8 cache read with ``k_scale`` /
    ``v_scale``, see kernels/attention_common.py). Sequences with fewer than ``min_query_len``
    query rows are left as they are in ``out`` (``paged_attention_ref`` batches its decodes separately). Reads the
    lengths on the host (a sync): for CPU and tests."""
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
        n = end - start
        if n < max(min_query_len, 1):
            continue
        seq_len = lens[i]
        keys, values = gather_kv(k_cache, v_cache, block_tables[i : i + 1], seq_len, k_scale=k_scale,
                                 v_scale=v_scale, dtype=q.dtype)
        query_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        mask = visible_keys(query_pos, seq_len, sliding_window)
        out[start:end] = attend(q[None, start:end], keys, values, mask[None], scale, softcap=softcap,
                                alibi_slopes=alibi_slopes, query_pos=query_pos[None])[0]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_seqs"])  # one compiled kernel whatever the batch size
def _prefill_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    qk_scale,  # the fp8 cache's k_scale folded in
    cap_log2,
    slopes_ptr,  # [Hq] float32 ALiBi slopes (ALIBI only)
    sliding_window,  # 0: none
    v_scale,  # the fp8 cache's value scale (KV_FP8 only)
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
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    WINDOW: tl.constexpr,
    KV_FP8: tl.constexpr,
    FP8_F16_DOTS: tl.constexpr,  # KV_FP8 with fp16/bf16 queries: dots in fp16 (see queries_to_fp16)
    V_PAIRS: tl.constexpr,  # fp8 V tiles read as uint16 pairs (see e4m3_pairs_to_fp16)
    PAIRS_ASM: tl.constexpr,  # ... converted by the PTX instruction (CUDA), else byte by byte
    SPLIT_V: tl.constexpr,  # ... and p @ v in two halves of the keys (see split_pv)
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
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr + (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=tile_mask,
        other=0.0,
    )
    if FP8_F16_DOTS:
        q, qk_scale = queries_to_fp16(q, qk_scale)  # the fp8 tiles are converted to fp16
    elif not KV_FP8:
        q = q.to(k_cache_ptr.dtype.element_ty)  # an fp8 cache's tiles are upcast to q's dtype instead
    q_pos = context_len + tok

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    # Keys below the tile's first query position are visible to every row: whole tiles there need no mask. The first
    # masked tile's first key is visible to every row too, so no row ever sees an all -inf tile before a finite one.
    first_pos = context_len + q_block * BLOCK_Q
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    slopes = tl.load(slopes_ptr + heads, mask=row_mask, other=0.0) if ALIBI else l_i
    if WINDOW:
        # Every tile masked (the window's lower edge moves with each row), from the first tile the first row sees.
        window_lo = tl.maximum(first_pos - sliding_window + 1, 0) // TILE_N * TILE_N
        full_end = window_lo
    else:
        window_lo = 0
        full_end = (first_pos + 1) // TILE_N * TILE_N
    for tile_start in range(window_lo, full_end, TILE_N):
        acc, m_i, l_i = attend_kv_tile(
            acc, m_i, l_i, q, q_pos, tile_start, kv_end, table, k_base, v_base, qk_scale, cap_log2, slopes,
            sliding_window, stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_D, BLOCK_SIZE, TILE_N, False,
            IEEE, SOFTCAP, ALIBI, WINDOW, V_PAIRS, PAIRS_ASM, False, SPLIT_V,
        )  # fmt: skip
    for tile_start in range(full_end, kv_end, TILE_N):
        acc, m_i, l_i = attend_kv_tile(
            acc, m_i, l_i, q, q_pos, tile_start, kv_end, table, k_base, v_base, qk_scale, cap_log2, slopes,
            sliding_window, stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_D, BLOCK_SIZE, TILE_N, True,
            IEEE, SOFTCAP, ALIBI, WINDOW, V_PAIRS, PAIRS_ASM, False, SPLIT_V,
        )  # fmt: skip

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if KV_FP8:
        out = out * v_scale
    tl.store(
        out_ptr + (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=tile_mask,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Launch configuration (static: a function of shapes and dtypes only, never of tensor values)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    tile_n: int
    num_warps: int
    num_stages: int
    # How an fp8 cache is read: see DecodeConfig.fp8_path and kernels/attention_common.py fp8_read_flags.
    fp8_path: str = "f16-vpairs"


# (minimum average query length T / B, config): the first whose threshold the batch meets wins.
PREFILL_CONFIGS: list[tuple[float, PrefillConfig]] = [
    (64.0, PrefillConfig(block_m=128, tile_n=64, num_warps=8, num_stages=2)),
    (8.0, PrefillConfig(block_m=64, tile_n=64, num_warps=4, num_stages=2)),
    (0.0, PrefillConfig(block_m=16, tile_n=64, num_warps=4, num_stages=2)),
]


def pick_prefill_config(num_tokens: int, num_seqs: int) -> PrefillConfig:
    """The launch config for a batch, by its average query length (see :data:`PREFILL_CONFIGS`)."""
    avg = num_tokens / max(num_seqs, 1)
    for threshold, config in PREFILL_CONFIGS:
        if avg >= threshold:
            return config
    return PREFILL_CONFIGS[-1][1]


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
    sliding_window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Triton varlen causal attention over the paged cache, for any mix of prefill chunks and decodes.
    ``sliding_window``, ``softcap``, ``alibi_slopes`` and an fp8 cache's ``k_scale``/``v_scale`` as in the reference
    (kernels/attention_common.py).

    The grid is sized from ``T`` and ``B`` (shapes), so it needs no host copy of the lengths either.
    """
    out = check_attention_args(q, k_cache, v_cache, block_tables, out)
    num_tokens, num_q_heads, head_dim = q.shape
    batch = seq_lens.shape[0]
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    if num_tokens == 0 or batch == 0:
        return out
    config = config or pick_prefill_config(num_tokens, batch)
    block_m = max(config.block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (num_tokens // block_q + batch, num_kv_heads)
    kv_fp8 = is_fp8_cache(k_cache)
    _prefill_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        *score_params(scale * (k_scale if kv_fp8 else 1.0), softcap), alibi_slopes if alibi_slopes is not None else q,
        sliding_window, v_scale if kv_fp8 else 1.0, batch,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        HEAD_DIM=head_dim,
        BLOCK_D=head_dim_block(head_dim),
        BLOCK_SIZE=block_size,
        TILE_N=config.tile_n,
        IEEE=kv_compute_dtype(q, k_cache) == torch.float32,
        SOFTCAP=softcap > 0,
        ALIBI=alibi_slopes is not None,
        WINDOW=sliding_window > 0,
        KV_FP8=kv_fp8,
        **fp8_read_flags(q, k_cache, v_cache, config.fp8_path),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    return out
