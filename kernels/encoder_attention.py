"""Bidirectional (non-causal) varlen attention for encoder models: every token of a sequence attends to every token
of the same sequence, sequences packed back to back (``cu_seqlens``), no KV cache.

Triton kernel (flash-attention style online softmax, one program per (sequence, head, query block)) beside the
plain-torch reference (padded batch + key-padding mask through ``scaled_dot_product_attention``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton


@triton.jit
def _encoder_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_ptr, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    HEADS_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - start
    if m_block * BLOCK_M >= seq_len:
        return
    kv_head = head // HEADS_PER_KV
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < seq_len
    q = tl.load(q_ptr + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for n0 in range(0, seq_len, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seq_len
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + (start + offs_n)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + (start + offs_n)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + (start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def encoder_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seq_len: int, scale: float
) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, Hkv, D] (token-major, any head/token strides with unit last stride);
    cu_seqlens: [B + 1] int32 on the same device. Returns [T, H, D] in q's dtype."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    out = torch.empty_like(q)
    num_seqs = cu_seqlens.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    block_m = 64 if max_seq_len > 32 else 16
    block_n = 64 if head_dim_pad <= 64 else 32
    grid = (num_seqs, num_heads, triton.cdiv(max_seq_len, block_m))
    _encoder_attention_kernel[grid](
        q, k, v, out, cu_seqlens, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        HEADS_PER_KV=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return out


def encoder_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seq_len: int, scale: float
) -> torch.Tensor:
    """The same result in plain torch: scatter the packed tokens into a padded [B, H, Lmax, D] batch, run SDPA with
    a key-padding mask, gather back. No per-sequence Python loop."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    num_seqs = cu_seqlens.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return torch.empty_like(q)
    starts = cu_seqlens[:-1].long()
    lens = cu_seqlens[1:].long() - starts
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), lens, output_size=num_tokens)
    pos_in_seq = torch.arange(num_tokens, device=q.device) - starts[seq_of_token]

    def padded(x: torch.Tensor, heads: int) -> torch.Tensor:
        out = x.new_zeros(num_seqs, max_seq_len, heads, head_dim)
        out[seq_of_token, pos_in_seq] = x
        out = out.transpose(1, 2)
        if heads != num_heads:
            out = out.repeat_interleave(num_heads // heads, dim=1)
        return out

    key_valid = torch.arange(max_seq_len, device=q.device)[None, :] < lens[:, None]  # [B, Lmax]
    attn = torch.nn.functional.scaled_dot_product_attention(
        padded(q, num_heads), padded(k, num_kv_heads), padded(v, num_kv_heads),
        attn_mask=key_valid[:, None, None, :], scale=scale,
    )
    return attn.transpose(1, 2)[seq_of_token, pos_in_seq]


def encoder_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seq_len: int, scale: float,
    *, backend: str = "auto",
) -> torch.Tensor:
    """Dispatcher: Triton on CUDA tensors, the torch reference elsewhere or with ``backend="torch"``
    (kernels/backend.py)."""
    if use_triton(q, backend):
        return encoder_attention_triton(q, k, v, cu_seqlens, max_seq_len, scale)
    return encoder_attention_reference(q, k, v, cu_seqlens, max_seq_len, scale)
