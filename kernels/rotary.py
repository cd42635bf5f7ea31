"""Rotary position embedding (neox / rotate-half style, as HF Llama and Qwen apply it)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` by their positions; returns new tensors.

    ``cos_sin_cache`` is ``[max_positions, D]`` float32: cos in the first half of the last dim, sin in the second.
    """
    cos_sin = cos_sin_cache.index_select(0, positions.long())
    half = cos_sin.shape[-1] // 2
    cos = cos_sin[:, None, :half]
    sin = cos_sin[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


@triton.jit
def _rotate_heads(x_ptr, token, stride_t, stride_h, cos, sin, NUM_HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):  # fmt: skip
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    offs = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (offs < HALF)
    first = x_ptr + token * stride_t + heads * stride_h + offs
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cs,
    NUM_Q_HEADS: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs, mask=offs < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs, mask=offs < HALF, other=0.0)
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, BLOCK_Q_HEADS, HALF, BLOCK_HALF)
    _rotate_heads(k_ptr, token, stride_kt, stride_kh, cos, sin, NUM_K_HEADS, BLOCK_K_HEADS, HALF, BLOCK_HALF)


def rotary_embedding_triton(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IN PLACE on ``q`` and ``k`` (which may be strided views, e.g. of a fused qkv output); returns ``(q, k)``."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if cos_sin_cache.shape[-1] != head_dim:
        raise ValueError(f"cos_sin_cache last dim {cos_sin_cache.shape[-1]} != head_dim {head_dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k and cos_sin_cache need a unit last stride")
    if num_tokens == 0:
        return q, k
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads,
        BLOCK_Q_HEADS=triton.next_power_of_2(num_q_heads),
        NUM_K_HEADS=num_k_heads,
        BLOCK_K_HEADS=triton.next_power_of_2(num_k_heads),
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )  # fmt: skip
    return q, k


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """On CUDA rotates in place and returns ``(q, k)`` themselves; on CPU returns new tensors. Use the return values."""
    if use_triton(q):
        return rotary_embedding_triton(positions, q, k, cos_sin_cache)
    return rotary_embedding_ref(positions, q, k, cos_sin_cache)
