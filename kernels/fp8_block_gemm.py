"""Block-scaled fp8 weights, as DeepSeek-V3 and the Qwen3 FP8 checkpoints store them: an e4m3 ``[N, K]`` weight and
one fp32 scale per ``[block_n, block_k]`` block (``weight_scale_inv [ceil(N / block_n), ceil(K / block_k)]``,
``W = q * scale[n // block_n, k // block_k]``).

The product is w8a16: each program widens its e4m3 weight tiles to x's dtype in registers, multiplies them on the
tensor cores, and scales each K step's partial product by its block's scales (a ``BLOCK_K`` step lies inside one
scale block) before adding it up in fp32. The weight is read once at half the bytes of bf16; the activations are not
quantized (vLLM quantizes them per 128-wide group for an fp8 GEMM: closer to the 16-bit model here, slower at large
batches, where the tensor cores' fp8 rate would count). :func:`fp8_block_linear_ref` is the plain-torch reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.split_k import MAX_SPLIT_K, decode_launch, split_workspace, store_split_partial


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` -> (e4m3 weight, fp32 ``[ceil(N / bn), ceil(K / bk)]`` scales: each block's absmax / 448), the
    layout block-scaled checkpoints hold (benchmarks and tests make their weights with it)."""
    n, k = weight.shape
    block_n, block_k = block
    padded = weight.new_zeros(-(-n // block_n) * block_n, -(-k // block_k) * block_k, dtype=torch.float32)
    padded[:n, :k] = weight.float()
    scale = padded.reshape(padded.shape[0] // block_n, block_n, -1, block_k).abs().amax(dim=(1, 3))
    scale = scale.clamp(min=1e-12) / 448.0
    expanded = scale.repeat_interleave(block_n, 0)[:n].repeat_interleave(block_k, 1)[:, :k]
    return (weight.float() / expanded).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def dequantize_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The fp32 ``[N, K]`` weight: each e4m3 value times its block's scale."""
    n, k = weight.shape
    block_n, block_k = block
    expanded = scale.float().repeat_interleave(block_n, 0)[:n].repeat_interleave(block_k, 1)[:, :k]
    return weight.float() * expanded


def fp8_block_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                         bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Reference: dequantize the whole weight, fp32 matmul, x's dtype out."""
    out = x.float() @ dequantize_fp8_blocks(weight, scale, block).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program ``(m, n, k)`` of a ``(M / BLOCK_M, N / BLOCK_N, splits)`` grid: its column block and K split, its
    output rows and columns and which of them exist."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.program_id(1), tl.program_id(2), offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _fp8_block_gemm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, partial_ptr, counter_ptr, M, N, K, k_per_split, split_k,
                           stride_xm, stride_wn, stride_sn, stride_om, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr = False):  # fmt: skip
    """``out[m, n] = sum over K steps of scale[n // SCALE_N, k0 // SCALE_K] * (x[m, k0:] @ q[n, k0:])``; ``BLOCK_K``
    divides ``SCALE_K``, so one step's partial product takes one scale per output column. ``SPLIT`` (decode rows, one
    M block): program ``(n, k)`` adds up its ``k_per_split`` share of K and the column block's last program to finish
    adds the shares up in order (``kernels/split_k.py``)."""
    pid_n, pid_k, offs_m, offs_n, m_live, n_live = output_tile(M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]: the weight transposed
    s_ptrs = s_ptr + (offs_n // SCALE_N) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        k_live = offs_k + k0 < K
        x = tl.load(x_ptrs + k0, mask=m_live[:, None] & k_live[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_live[:, None] & n_live[None, :], other=0.0).to(x.dtype)
        scale = tl.load(s_ptrs + k0 // SCALE_K, mask=n_live, other=0.0)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION) * scale[None, :]
    if SPLIT:
        store_split_partial(acc, out_ptr, partial_ptr, counter_ptr, pid_n, pid_k, split_k, M, N, stride_om, True)
    else:
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_live[:, None] & n_live[None, :])


def block_gemm_tiles(m: int, block_k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): 16 rows for decode batches (their BLOCK_N and K split: ``decode_launch``) in K
    steps of up to 128, 64 rows for prefill in steps of up to 64 (at 128, Triton 3.6 spills for sm_90); steps that
    divide the scale block."""
    step = 128 if m <= 16 else 64
    while block_k % step:
        step //= 2
    return (16, 32, step) if m <= 16 else (64, 64, step)


def launch_weight_tiles(x: torch.Tensor, n: int, k: int, block_k_of: Callable[[int], int], launch) -> torch.Tensor:
    """What the weight-only tile kernels share (this one, ``bnb4_gemm``, ``int8_gemm``): ``x [..., K]`` as
    contiguous rows, the output ``[..., N]`` in x's dtype, 16 x 32 tiles for decode rows (split over K by
    :func:`decode_split`) and 64 x 64 for prefill, K steps of ``block_k_of(rows)``. ``launch(grid, x2, out,
    partials, counters, m, k_per_split, split_k, **meta)`` starts the kernel; ``meta`` holds its block sizes,
    ``DOT_PRECISION``, ``SPLIT`` and launch options."""
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m, block_n = (16, 32) if m <= 16 else (64, 64)
        block_k = block_k_of(m)
        block_n, k_per_split, split_k = decode_split(m, n, k, block_n, block_k, x.device)
        partials, counters = split_workspace(out, split_k, triton.cdiv(n, block_n)) if split_k > 1 else (out, out)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
        launch(grid, x2, out, partials, counters, m, k_per_split, split_k, BLOCK_M=block_m, BLOCK_N=block_n,
               BLOCK_K=block_k, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SPLIT=split_k > 1,
               num_warps=4, num_stages=3)  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


def fp8_block_gemm_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
                          ) -> torch.Tensor:  # fmt: skip
    """The Triton kernel: ``x [..., K]`` (fp16 / bf16 / fp32) times the block-scaled ``weight [N, K]``, in x's
    dtype. The scale block's K side must be a multiple of 16 (a ``tl.dot`` step)."""
    n, k = weight.shape

    def launch(grid, x2, out, partials, counters, m, k_per_split, split_k, **meta):
        _fp8_block_gemm_kernel[grid](x2, weight, scale, out, partials, counters, m, n, k, k_per_split, split_k,
                                     x2.stride(0), weight.stride(0), scale.stride(0), out.stride(0),
                                     SCALE_N=block[0], SCALE_K=block[1], **meta)  # fmt: skip

    return launch_weight_tiles(x, n, k, lambda m: block_gemm_tiles(m, block[1])[2], launch)


def decode_split(m: int, n: int, k: int, block_n: int, block_k: int, device: torch.device) -> tuple[int, int, int]:
    """``(block_n, k_per_split, split_k)``: decode rows (one 16-row block) take ``decode_launch``'s narrower blocks
    and K split, so a few thousand output rows still give every SM programs; prefill keeps its tiles, unsplit."""
    if m > 16:
        return block_n, k, 1
    k_blocks = triton.cdiv(k, block_k)
    block_n, split_k = decode_launch(n, k_blocks, device.index if device.type == "cuda" else None, (64, 32, 16))
    k_per_split = triton.cdiv(k_blocks, min(split_k, MAX_SPLIT_K.value)) * block_k
    return block_n, k_per_split, triton.cdiv(k, k_per_split)


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                     bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """``x @ W^T (+ bias)`` for a block-scaled e4m3 weight: the Triton kernel on CUDA, the reference otherwise."""
    if not use_triton(x, backend) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or block[1] % 16:
        return fp8_block_linear_ref(x, weight, scale, block, bias)
    out = fp8_block_gemm_triton(x, weight, scale, block)
    return out + bias if bias is not None else out
