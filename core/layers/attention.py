"""Attention over the paged KV cache: one fused launch for [q/k norm ->] RoPE -> cache write, then attention
through the block tables.

The cache's element type is the cache tensor's: with ``--kv-cache-dtype fp8`` the runner allocates e4m3 caches and
each layer quantizes with its own ``k_scale`` / ``v_scale`` (1.0, or the checkpoint's: :func:`load_kv_scale`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from core.layers.norm import RMSNorm
from core.layers.rotary import RotaryEmbedding
from kernels.attention_prep import attention_prep
from kernels.backend import check_backend
from kernels.paged_attention import paged_attention


@dataclass
class AttentionMetadata:
    """Per-step batch layout, shared by every layer. Tensors live on the model's device."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (block_id * block_size + offset)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with the null block
    seq_lens: torch.Tensor  # [B] int32: context length including this step's tokens
    query_start_loc: torch.Tensor  # [B + 1] int32: row offsets of each sequence's new tokens
    max_query_len: int  # on the host: 1 means a decode-only batch
    decode_order: torch.Tensor | None = None  # [B] int32 permutation: decode attention's launch order
    # > 1: a speculative verify step, every sequence at most this many query rows (its last token and its drafts):
    # attention takes the multi-query decode kernel (kernels/paged_attention.py)
    decode_queries: int = 0


class PagedAttention(nn.Module):
    """``attention_backend`` picks the attention kernel, ``kernel_backend`` the fused prep kernel (see
    kernels/backend.py)."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, rotary: RotaryEmbedding,
        q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None, *,
        attention_backend: str = "auto", kernel_backend: str = "auto",
        scale: float | None = None, sliding_window: int = 0, softcap: float = 0.0,
        alibi_slopes: torch.Tensor | None = None,
    ) -> None:
        """``scale``: default ``head_dim ** -0.5``; ``sliding_window`` (0: full causal), ``softcap`` (0: none) and
        ``alibi_slopes`` (``[num_heads]``) are this layer's attention features (kernels/attention_common.py)."""
        super().__init__()
        self.attention_backend = check_backend(attention_backend, "attention backend")
        self.kernel_backend = check_backend(kernel_backend)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        if alibi_slopes is not None:
            self.register_buffer("alibi_slopes", alibi_slopes.float(), persistent=False)
        else:
            self.alibi_slopes = None
        self.rotary = rotary
        self.q_norm = q_norm
        self.k_norm = k_norm
        # Per-tensor scales of an fp8 KV cache (cached value = x / scale); the kernels ignore them for other caches.
        # Python floats: fixed after loading, so CUDA graphs capture them as launch arguments.
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """``q`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hk, D]``; ``kv_cache`` ``[2, num_blocks, block_size, Hk, D]``."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        positions = self.rotary.table_positions(positions, meta.seq_lens, meta.query_start_loc)
        q = attention_prep(
            positions, q, k, v, self.rotary.cos_sin_cache, k_cache, v_cache, meta.slot_mapping,
            self.q_norm.weight if self.q_norm is not None else None,
            self.k_norm.weight if self.k_norm is not None else None,
            self.q_norm.eps if self.q_norm is not None else 1e-6,
            backend=self.kernel_backend, k_scale=self.k_scale, v_scale=self.v_scale,
        )
        return self.attend(q, kv_cache, meta)

    def fused_qkv_prep(self, qkv_proj: nn.Module, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                       meta: AttentionMetadata) -> torch.Tensor | None:  # fmt: skip
        """q ``[T, Hq, D]`` from a qkv projection whose kernel also does the prep (``Linear.rope_cache_forward``:
        the W8A8 fp8 decode GEMV), the new keys and values already in the cache; None where the projection has no
        such kernel or this layer needs what it leaves out (q/k norm, an fp8 cache's scales: then project and call
        this module). Follow it with :meth:`attend`."""
        if self.q_norm is not None or self.kernel_backend == "torch" or not qkv_proj.may_rope_cache(x):
            return None  # before the table positions: a longrope model's are a few kernels per layer
        q = qkv_proj.rope_cache_forward(
            x, positions=self.rotary.table_positions(positions, meta.seq_lens, meta.query_start_loc),
            cos_sin_cache=self.rotary.cos_sin_cache, k_cache=kv_cache[0], v_cache=kv_cache[1],
            slot_mapping=meta.slot_mapping, q_rows=self.num_heads * self.head_dim,
            kv_rows=self.num_kv_heads * self.head_dim, head_dim=self.head_dim,
        )  # fmt: skip
        return None if q is None else q.view(-1, self.num_heads, self.head_dim)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of the prepared ``q`` over the cache (the new keys and values already written)."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        out = paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                              self.scale, max_query_len=meta.max_query_len, backend=self.attention_backend,
                              decode_order=meta.decode_order, decode_queries=meta.decode_queries,
                              sliding_window=self.sliding_window,
                              softcap=self.softcap, alibi_slopes=self.alibi_slopes, k_scale=self.k_scale,
                              v_scale=self.v_scale)  # fmt: skip
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)


# Checkpoint names of KV-cache scales (vLLM's spellings): the suffix -> which of the layer's scales it sets.
KV_SCALE_NAMES: dict[str, tuple[str, ...]] = {
    ".k_scale": ("k_scale",),
    ".v_scale": ("v_scale",),
    ".kv_scale": ("k_scale", "v_scale"),  # older fp8 checkpoints: one scale for both
    ".k_proj.output_scale": ("k_scale",),  # older compressed-tensors checkpoints
    ".v_proj.output_scale": ("v_scale",),
}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def load_kv_scale(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """If ``name`` is a KV-cache scale (``model.layers.3.self_attn.k_scale`` ...), set it on layer 3's
    :class:`PagedAttention` and return True; False for any other tensor. The scale is used when the cache is fp8
    (``--kv-cache-dtype fp8``) and ignored otherwise, as in vLLM."""
    attrs = next((a for suffix, a in KV_SCALE_NAMES.items() if name.endswith(suffix)), None)
    if attrs is None:
        return False
    match = _LAYER_INDEX.search(name)
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    if match is None or int(match.group(1)) >= len(layers):
        raise ValueError(f"KV-cache scale '{name}' names no attention layer of this model ({len(layers)} layers).")
    if tensor.numel() != 1:
        raise ValueError(f"KV-cache scale '{name}' has {tensor.numel()} values; only per-tensor scales (one value "
                         "per layer for keys and one for values) are supported.")
    value = float(tensor.reshape(()).float())
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"KV-cache scale '{name}' must be a positive finite number, got {value}.")
    for attr in attrs:
        setattr(layers[int(match.group(1))], attr, value)
    return True
