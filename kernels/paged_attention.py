"""Causal attention over the paged KV cache, for any mix of prefill chunks and decodes: the dispatcher the attention
layer calls, and the torch reference of the whole contract.

The kernels live beside their own references: kernels/decode_attention.py (one query row per sequence; the
CUDA-graph path) and kernels/prefill_attention.py (varlen); the layout they share is described in
kernels/attention_common.py. ``decode_order_host`` is re-exported here because the runner stages the permutation
this dispatcher takes as ``decode_order``.
"""

from __future__ import annotations

import torch

from kernels.attention_common import triton_supports
from kernels.backend import use_triton
from kernels.decode_attention import (
    decode_order_host, multi_query_decode_supported, paged_decode_attention, paged_decode_attention_ref,
)
from kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref

__all__ = ["decode_order_host", "paged_attention", "paged_attention_ref"]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    sliding_window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    decode_queries: int = 1,
) -> torch.Tensor:
    """Plain-torch reference: decodes (sequences of at most ``decode_queries`` rows: with speculative decoding a
    verify step's last token and drafts) in one padded batch, prefill chunks one sequence at a time. ``sliding_window``
    (0: none), ``softcap`` (0: none), ``alibi_slopes`` (``[Hq]``) and an fp8 cache's ``k_scale``/``v_scale``
    (ignored for other caches): see kernels/attention_common.py.

    ``q``: ``[T, Hq, D]``; caches ``[num_blocks, block_size, Hk, D]``; returns ``[T, Hq, D]`` in ``q``'s dtype.
    Reads the lengths on the host (a sync): fine for CPU and for tests, not for the GPU fast path.
    """
    args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    features = dict(sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes, k_scale=k_scale,
                    v_scale=v_scale)
    out = paged_decode_attention_ref(*args, queries=decode_queries, **features)
    return paged_prefill_attention_ref(*args, out=out, min_query_len=decode_queries + 1, **features)


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
    backend: str = "auto",
    decode_order: torch.Tensor | None = None,
    decode_queries: int = 0,
    sliding_window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal paged attention (see kernels/attention_common.py); ``out`` may be a persistent buffer (CUDA graphs).

    On CUDA: the split-K decode kernel when ``max_query_len == 1`` (every sequence has at most one query row; the
    CUDA-graph path; ``decode_order`` is its optional launch order, see :func:`paged_decode_attention`), the varlen
    prefill kernel otherwise (``max_query_len=None`` is always safe). ``decode_queries`` > 1 (the runner's uniform
    speculative verify steps: every sequence has at most that many query rows, its last token and its drafts) takes
    the decode kernel with that many query rows per sequence, when its (query, head) rows fit one tile
    (:func:`multi_query_decode_supported`); a step whose ``max_query_len`` exceeds it is refused. Any head dim runs
    in the kernels (padded to a power of two); layouts they do not handle (query heads not a multiple of the KV heads,
    strided last dims) fall back to the reference. ``backend="torch"`` forces the reference, which syncs and is not
    graph-safe (kernels/backend.py). An fp8 (e4m3) cache is read with its per-layer ``k_scale``/``v_scale``.
    """
    features = dict(sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes, k_scale=k_scale,
                    v_scale=v_scale)
    if decode_queries > 1 and max_query_len is not None and max_query_len > decode_queries:
        raise ValueError(f"a step with decode_queries={decode_queries} has a sequence of {max_query_len} query rows")
    if use_triton(q, backend) and triton_supports(q, k_cache):
        if max_query_len == 1:
            return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                          out=out, seq_order=decode_order, **features)  # fmt: skip
        if decode_queries > 1 and multi_query_decode_supported(decode_queries, q.shape[1] // k_cache.shape[2]):
            return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                          out=out, seq_order=decode_order, queries=decode_queries,
                                          **features)  # fmt: skip
        return paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out=out,
                                       **features)  # fmt: skip
    result = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                 decode_queries=max(decode_queries, 1), **features)  # fmt: skip
    if out is None:
        return result
    out.copy_(result)
    return out
