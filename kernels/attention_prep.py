"""Everything between the qkv projection and attention, in one launch per layer: optional per-head RMSNorm of q and k
(Qwen3's q_norm / k_norm), rotary embedding, and the write of the new keys and values into the paged cache.

Unfused this is 2 (Llama) to 4 (Qwen3) kernels per layer; in a CUDA-graph decode step each costs launch and tail time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.rmsnorm import rms_norm_ref


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, neox / rotate-half style as HF Llama and Qwen apply it: rotate ``q`` ``[T, Hq, D]`` and ``k``
    ``[T, Hk, D]`` by their positions; returns new tensors.

    ``cos_sin_cache`` is ``[max_positions, R]`` float32: cos in the first half of the last dim, sin in the second.
    ``R`` < D is partial rotary (GPT-NeoX, Phi): only the first ``R`` dims rotate, the rest pass through.
    """
    cos_sin = cos_sin_cache.index_select(0, positions.long())
    half = cos_sin.shape[-1] // 2
    cos = cos_sin[:, None, :half]
    sin = cos_sin[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def write_kv_cache_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write the new keys and values into the paged cache through the slot mapping. ``k``/``v``: ``[T, Hk, D]``;
    caches: ``[num_blocks, block_size, Hk, D]``; slot = block * block_size + offset; negative slots (padding) skip."""
    num_heads, head_dim = k_cache.shape[-2:]
    flat_k = k_cache.view(-1, num_heads, head_dim)
    flat_v = v_cache.view(-1, num_heads, head_dim)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, k, v = slot_mapping[valid], k[valid], v[valid]
    flat_k.index_copy_(0, slot_mapping.long(), k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping.long(), v.to(flat_v.dtype))


def attention_prep_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The composition of the references; returns the rotated (and normed) ``q`` as a new tensor."""
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("pass both q_norm_weight and k_norm_weight or neither")
    if q_norm_weight is not None:
        q = rms_norm_ref(q, q_norm_weight, eps)
        k = rms_norm_ref(k, k_norm_weight, eps)
    q, k = rotary_embedding_ref(positions, q, k, cos_sin_cache)
    write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


@triton.jit
def _load_heads(ptr, token, stride_t, stride_h, NUM_HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):  # fmt: skip
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    offs = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (offs < HALF)
    first = ptr + token * stride_t + heads * stride_h + offs
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1, x2, heads, offs, mask


@triton.jit
def _head_rms_norm(x1, x2, weight_ptr, eps, offs, HALF: tl.constexpr, DTYPE: tl.constexpr):
    """Per-head RMSNorm with the reference's roundings: normed rounded to DTYPE, times weight, rounded again."""
    inv = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(weight_ptr + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(weight_ptr + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    y1 = ((x1 * inv).to(DTYPE).to(tl.float32) * w1).to(DTYPE).to(tl.float32)
    y2 = ((x2 * inv).to(DTYPE).to(tl.float32) * w2).to(DTYPE).to(tl.float32)
    return y1, y2


@triton.jit
def _attention_prep_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    cos_sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    q_weight_ptr,
    k_weight_ptr,
    eps,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    NUM_Q_HEADS: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HAS_NORM: tl.constexpr,
    REST: tl.constexpr,  # head dims past the rotary ones (partial rotary), copied as they are
    BLOCK_REST: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_c, mask=offs_c < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_c, mask=offs_c < HALF, other=0.0)
    q_dtype = q_ptr.dtype.element_ty
    k_dtype = k_ptr.dtype.element_ty

    # q: norm, rotate, write back in place
    x1, x2, heads, offs, mask = _load_heads(q_ptr, token, stride_qt, stride_qh, NUM_Q_HEADS, BLOCK_Q_HEADS, HALF,
                                            BLOCK_HALF)  # fmt: skip
    if HAS_NORM:
        x1, x2 = _head_rms_norm(x1, x2, q_weight_ptr, eps, offs, HALF, q_dtype)
    first = q_ptr + token * stride_qt + heads * stride_qh + offs
    tl.store(first, (x1 * cos - x2 * sin).to(q_dtype), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(q_dtype), mask=mask)

    # k: norm, rotate (rounded to k's dtype like the reference), then into the cache with v; padding slots skip
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    x1, x2, heads, offs, mask = _load_heads(k_ptr, token, stride_kt, stride_kh, NUM_K_HEADS, BLOCK_K_HEADS, HALF,
                                            BLOCK_HALF)  # fmt: skip
    if HAS_NORM:
        x1, x2 = _head_rms_norm(x1, x2, k_weight_ptr, eps, offs, HALF, k_dtype)
    k1 = (x1 * cos - x2 * sin).to(k_dtype)
    k2 = (x2 * cos + x1 * sin).to(k_dtype)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        in_block = slot % BLOCK_SIZE
        k_dst = k_cache_ptr + block * stride_kcb + in_block * stride_kcs + heads * stride_kch + offs
        tl.store(k_dst, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v_src = v_ptr + token * stride_vt + heads * stride_vh + offs
        v_dst = v_cache_ptr + block * stride_vcb + in_block * stride_vcs + heads * stride_vch + offs
        tl.store(v_dst, tl.load(v_src, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
        if REST > 0:
            offs_r = tl.arange(0, BLOCK_REST)[None, :]
            rest_mask = (heads < NUM_K_HEADS) & (offs_r < REST)
            cols = 2 * HALF + offs_r
            k_src = k_ptr + token * stride_kt + heads * stride_kh + cols
            k_rest = k_cache_ptr + block * stride_kcb + in_block * stride_kcs + heads * stride_kch + cols
            tl.store(k_rest, tl.load(k_src, mask=rest_mask).to(k_cache_ptr.dtype.element_ty), mask=rest_mask)
            v_src_rest = v_ptr + token * stride_vt + heads * stride_vh + cols
            v_rest = v_cache_ptr + block * stride_vcb + in_block * stride_vcs + heads * stride_vch + cols
            tl.store(v_rest, tl.load(v_src_rest, mask=rest_mask).to(v_cache_ptr.dtype.element_ty), mask=rest_mask)


def attention_prep_triton(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """One program per token. ``q`` is rotated IN PLACE and returned; ``k`` and ``v`` are only read (the rotated keys
    go to the cache). All of q/k/v may be strided views of the fused qkv output (unit last stride)."""
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("pass both q_norm_weight and k_norm_weight or neither")
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    rotary_dim = cos_sin_cache.shape[-1]
    if rotary_dim > head_dim or rotary_dim % 2:
        raise ValueError(f"cos_sin_cache last dim {rotary_dim} must be even and <= head_dim {head_dim}")
    if rotary_dim != head_dim and q_norm_weight is not None:
        raise ValueError("q/k norm with partial rotary is not supported")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("cos_sin", cos_sin_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last stride")
    if num_tokens == 0:
        return q
    half = rotary_dim // 2
    rest = head_dim - rotary_dim
    has_norm = q_norm_weight is not None
    _attention_prep_kernel[(num_tokens,)](
        positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q_norm_weight if has_norm else q, k_norm_weight if has_norm else k, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_Q_HEADS=num_q_heads,
        BLOCK_Q_HEADS=triton.next_power_of_2(num_q_heads),
        NUM_K_HEADS=num_k_heads,
        BLOCK_K_HEADS=triton.next_power_of_2(num_k_heads),
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(max(half, 1)),  # no rotary (GPT-2, Falcon ALiBi): half = 0
        BLOCK_SIZE=k_cache.shape[1],
        HAS_NORM=has_norm,
        REST=rest,
        BLOCK_REST=triton.next_power_of_2(max(rest, 1)),
        num_warps=4,
    )  # fmt: skip
    return q


def attention_prep(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """[optional q/k per-head RMSNorm] -> RoPE -> cache write; returns the attention-ready ``q``.

    With Triton (CUDA, ``backend`` not "torch") ``q`` is modified in place and returned; the reference returns a new
    tensor. Use the return value.
    """
    args = (positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, q_norm_weight, k_norm_weight, eps)
    if use_triton(q, backend):
        return attention_prep_triton(*args)
    return attention_prep_ref(*args)
