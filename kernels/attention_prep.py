"""Everything between the qkv projection and attention, in one launch per layer: optional per-head RMSNorm of q and k
(Qwen3's q_norm / k_norm), rotary embedding, and the write of the new keys and values into the paged cache.

Unfused this is 2 (Llama) to 4 (Qwen3) kernels per layer; in a CUDA-graph decode step each costs launch and tail time.

An fp8 (e4m3) cache stores ``clamp(x / scale, +-448)`` with the layer's ``k_scale`` / ``v_scale`` (computed in
float32 from the values rounded to the model dtype, in the kernel and the reference alike); other caches store ``x``
cast to their dtype and ignore the scales. See kernels/attention_common.py for how the attention kernels read it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_common import FP8_E4M3_MAX, is_fp8_cache, quantize_kv_ref
from kernels.backend import use_triton
from kernels.pdl import launch_options, use_pdl, wait_then_release
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
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Write the new keys and values into the paged cache through the slot mapping. ``k``/``v``: ``[T, Hk, D]``;
    caches: ``[num_blocks, block_size, Hk, D]``; slot = block * block_size + offset; negative slots (padding) skip.
    An fp8 cache gets ``x / scale`` in e4m3 (module docstring)."""
    num_heads, head_dim = k_cache.shape[-2:]
    flat_k = k_cache.view(-1, num_heads, head_dim)
    flat_v = v_cache.view(-1, num_heads, head_dim)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, k, v = slot_mapping[valid], k[valid], v[valid]
    k, v = quantize_kv_ref(k, k_scale, flat_k.dtype), quantize_kv_ref(v, v_scale, flat_v.dtype)
    if is_fp8_cache(flat_k):  # torch has no index_copy_ for fp8 on every device: copy the bytes
        flat_k, flat_v, k, v = (t.view(torch.uint8) for t in (flat_k, flat_v, k, v))
    flat_k.index_copy_(0, slot_mapping.long(), k)
    flat_v.index_copy_(0, slot_mapping.long(), v)


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
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The composition of the references; returns the rotated (and normed) ``q`` as a new tensor."""
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("pass both q_norm_weight and k_norm_weight or neither")
    if q_norm_weight is not None:
        q = rms_norm_ref(q, q_norm_weight, eps)
        k = rms_norm_ref(k, k_norm_weight, eps)
    q, k = rotary_embedding_ref(positions, q, k, cos_sin_cache)
    write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
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


FP8_MAX = tl.constexpr(FP8_E4M3_MAX)


@triton.jit
def _round_to_e4m3(x):
    """float32 ``x`` (within +-448) rounded to the nearest e4m3 value, ties to even, as torch's cast rounds; the cast
    that follows is then exact. Done here rather than by the cast because Triton's interpreter rounds fp8 casts wrongly
    (ties away from zero, and a mantissa that rounds up past 1.75 loses its carry: 7.9 -> 4); on the GPU the result
    is the hardware cast's. Normals keep 3 mantissa bits (an integer add carries into the exponent); below 2^-6 the
    spacing is 2^-9 (the ``1.5 * 2^23`` trick rounds to an integer in float32)."""
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)  # -1048576: ~0xFFFFF
    magnitude = tl.abs(x)
    subnormal = ((magnitude * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    subnormal = tl.where(x < 0, -subnormal, subnormal)  # keeps the sign of values that round to zero, as torch
    return tl.where(magnitude < 0.015625, subnormal, normal)


@triton.jit
def _store_cache(ptrs, x, mask, inv_scale, FP8: tl.constexpr):
    """``x`` into the cache: an fp8 cache gets ``clamp(x * inv_scale)`` (in float32) rounded to e4m3, others ``x``
    cast."""
    if FP8:
        x = x.to(tl.float32) * inv_scale
        x = _round_to_e4m3(tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX))
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


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
    inv_k_scale,  # 1 / k_scale (KV_FP8 only)
    inv_v_scale,
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
    KV_FP8: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    wait_then_release(USE_PDL)
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
        _store_cache(k_dst, k1, mask, inv_k_scale, KV_FP8)
        _store_cache(k_dst + HALF, k2, mask, inv_k_scale, KV_FP8)
        v_src = v_ptr + token * stride_vt + heads * stride_vh + offs
        v_dst = v_cache_ptr + block * stride_vcb + in_block * stride_vcs + heads * stride_vch + offs
        _store_cache(v_dst, tl.load(v_src, mask=mask), mask, inv_v_scale, KV_FP8)
        _store_cache(v_dst + HALF, tl.load(v_src + HALF, mask=mask), mask, inv_v_scale, KV_FP8)
        if REST > 0:
            offs_r = tl.arange(0, BLOCK_REST)[None, :]
            rest_mask = (heads < NUM_K_HEADS) & (offs_r < REST)
            cols = 2 * HALF + offs_r
            k_src = k_ptr + token * stride_kt + heads * stride_kh + cols
            k_rest = k_cache_ptr + block * stride_kcb + in_block * stride_kcs + heads * stride_kch + cols
            _store_cache(k_rest, tl.load(k_src, mask=rest_mask), rest_mask, inv_k_scale, KV_FP8)
            v_src_rest = v_ptr + token * stride_vt + heads * stride_vh + cols
            v_rest = v_cache_ptr + block * stride_vcb + in_block * stride_vcs + heads * stride_vch + cols
            _store_cache(v_rest, tl.load(v_src_rest, mask=rest_mask), rest_mask, inv_v_scale, KV_FP8)


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
    k_scale: float = 1.0,
    v_scale: float = 1.0,
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
        q_norm_weight if has_norm else q, k_norm_weight if has_norm else k, eps, 1.0 / k_scale, 1.0 / v_scale,
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
        KV_FP8=is_fp8_cache(k_cache),
        num_warps=4,
        **launch_options(use_pdl(q)),
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
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """[optional q/k per-head RMSNorm] -> RoPE -> cache write; returns the attention-ready ``q``. ``k_scale`` /
    ``v_scale``: the quantization scales of an fp8 cache (ignored for other caches).

    With Triton (CUDA, ``backend`` not "torch") ``q`` is modified in place and returned; the reference returns a new
    tensor. Use the return value.
    """
    args = (positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, q_norm_weight, k_norm_weight, eps)
    if use_triton(q, backend):
        return attention_prep_triton(*args, k_scale, v_scale)
    return attention_prep_ref(*args, k_scale, v_scale)
