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
from kernels.decode_attention import decode_order_host, paged_decode_attention, paged_decode_attention_ref
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
) -> torch.Tensor:
    """Plain-torch reference: decodes in one padded batch, prefill chunks one sequence at a time. ``sliding_window``
    (0: none), ``softcap`` (0: none), ``alibi_slopes`` (``[Hq]``) and an fp8 cache's ``k_scale``/``v_scale``
    (ignored for other caches): see kernels/attention_common.py.

    ``q``: ``[T, Hq, D]``; caches ``[num_blocks, block_size, Hk, D]``; returns ``[T, Hq, D]`` in ``q``'s dtype.
    Reads the lengths on the host (a sync): fine for CPU and for tests, not for the GPU fast path.
    """
    args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    features = dict(sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes, k_scale=k_scale,
                    v_scale=v_scale)
    out = paged_decode_attention_ref(*args, **features)
    return paged_prefill_attention_ref(*args, out=out, min_query_len=2, **features)


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
    sliding_window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal paged attention (see kernels/attention_common.py); ``out`` may be a persistent buffer (CUDA graphs).

    On CUDA: the split-K decode kernel when ``max_query_len == 1`` (every sequence has at most one query row; the
    CUDA-graph path; ``decode_order`` is its optional launch order, see :func:`paged_decode_attention`), the varlen
    prefill kernel otherwise (``max_query_len=None`` is always safe). Any head dim runs in the kernels (padded to a
    power of two); layouts they do not handle (query heads not a multiple of the KV heads, strided last dims) fall
    back to the reference. ``backend="torch"`` forces the reference, which syncs and is not graph-safe
    (kernels/backend.py). An fp8 (e4m3) cache is read with its per-layer ``k_scale``/``v_scale``.
    """
    features = dict(sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes, k_scale=k_scale,
                    v_scale=v_scale)
    if use_triton(q, backend) and triton_supports(q, k_cache):
        if max_query_len == 1:
            return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                          out=out, seq_order=decode_order, **features)  # fmt: skip
        return paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out=out,
                                       **features)  # fmt: skip
    result = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, **features)
    if out is None:
        return result
    out.copy_(result)
    return out
