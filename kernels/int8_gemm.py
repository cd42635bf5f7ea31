"""int8 weights with one scale per output row, times 16-bit activations (w8a16): bitsandbytes' 8-bit (LLM.int8)
checkpoints, whose ``weight`` holds ``round(127 * W / absmax_row)`` and ``SCB`` each row's absmax, so
``W[n, k] = weight[n, k] * scale[n]`` with ``scale = SCB / 127``.

LLM.int8 itself quantizes the activations too (per token, to int8) and runs the columns with outliers above a
threshold apart in 16 bits; here the activations are never quantized, which is what that decomposition
approximates, so the threshold has nothing left to decide. The Triton kernel widens each ``[BLOCK_N, BLOCK_K]``
int8 tile to x's dtype (exact: every int8 is a bf16 / fp16), multiplies on the tensor cores and scales each output
column once after the K loop. :func:`int8_linear_ref` is the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.fp8_block_gemm import launch_weight_tiles, output_tile
from kernels.split_k import store_split_partial


def int8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:  # fmt: skip
    """Reference: dequantize the whole weight, fp32 matmul, x's dtype out."""
    out = x.float() @ (weight.float() * scale.float()[:, None]).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` -> (int8 codes ``round(127 * W / absmax_row)``, fp32 absmax ``[N]``): bitsandbytes'
    ``int8_vectorwise_quant`` without outliers, i.e. what an 8-bit checkpoint stores as ``weight`` and ``SCB``."""
    absmax = weight.float().abs().amax(1).clamp(min=1e-12)
    codes = torch.round(weight.float() * (127.0 / absmax[:, None])).clamp(-127, 127).to(torch.int8)
    return codes, absmax


@triton.jit
def _int8_gemm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, partial_ptr, counter_ptr, M, N, K, k_per_split, split_k,
                      stride_xm, stride_wn, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr = False):  # fmt: skip
    """``out = (x @ weight^T) * scale`` over K steps of ``BLOCK_K`` (K a multiple of it); ``SPLIT``: K shared out
    as ``kernels/fp8_block_gemm.py``'s decode launch does (each split's partial product scaled alike, so the sum
    is the same)."""
    pid_n, pid_k, offs_m, offs_n, m_live, n_live = output_tile(M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=m_live[:, None], other=0.0)
        w = tl.load(w_ptrs + k0, mask=n_live[:, None], other=0).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    acc = acc * tl.load(s_ptr + offs_n, mask=n_live, other=0.0)[None, :]
    if SPLIT:
        store_split_partial(acc, out_ptr, partial_ptr, counter_ptr, pid_n, pid_k, split_k, M, N, stride_om, True)
    else:
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_live[:, None] & n_live[None, :])


def int8_gemm_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The Triton kernel: ``x [..., K]`` (fp16 / bf16 / fp32) times the int8 ``weight [N, K]`` (K a multiple of
    32) with fp32 ``scale [N]``, in x's dtype."""
    n, k = weight.shape

    def launch(grid, x2, out, partials, counters, m, k_per_split, split_k, **meta):
        _int8_gemm_kernel[grid](x2, weight, scale, out, partials, counters, m, n, k, k_per_split, split_k,
                                x2.stride(0), weight.stride(0), out.stride(0), **meta)  # fmt: skip

    return launch_weight_tiles(x, n, k, lambda m: 64 if k % 64 == 0 else 32, launch)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """``x @ (weight * scale)^T (+ bias)``: the Triton kernel on CUDA, the reference otherwise."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if not use_triton(x, backend) or x.dtype not in dtypes or weight.shape[1] % 32:
        return int8_linear_ref(x, weight, scale, bias)
    out = int8_gemm_triton(x, weight, scale)
    return out + bias if bias is not None else out
