"""8-bit weights times 16-bit activations (w8a16): bitsandbytes' 8-bit (LLM.int8) checkpoints, whose ``weight``
holds ``round(127 * W / absmax_row)`` and ``SCB`` each row's absmax, so ``W[n, k] = weight[n, k] * scale[n]`` with
``scale = SCB / 127`` (int8 codes, one scale per output row); and GPTQ 8-bit checkpoints, ``W[n, k] = (q[n, k] -
zero[n, g]) * scale[n, g]`` for the group ``g = k // group`` (uint8 codes, a scale and zero point per group).

LLM.int8 itself quantizes the activations too (per token, to int8) and runs the columns with outliers above a
threshold apart in 16 bits; here the activations are never quantized, which is what that decomposition
approximates, so the threshold has nothing left to decide. The Triton kernel widens each ``[BLOCK_N, BLOCK_K]``
int8 tile to x's dtype (exact: every int8 is a bf16 / fp16), multiplies on the tensor cores and scales each output
column once after the K loop; with groups, each K step's product of the exact integers ``q - zero`` is scaled by
its group's scales. Decode rows run it (one row: the byte-codes GEMV); past
``DEQUANT_MIN_M`` rows the weight is dequantized once for cuBLAS (``kernels/codes_dequant.py``).
:func:`int8_linear_ref` is the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.codes_dequant import codes_dequant_gemm
from kernels.codes_gemv import codes_gemv, gemv_fits
from kernels.fp8_block_gemm import launch_weight_tiles, output_tile
from kernels.split_k import store_split_partial

# Rows of x from which the weight is dequantized for one cuBLAS GEMM (as int4's INT4_DEQUANT_MIN_M). H100, Llama-8B
# (2026-12-05): this kernel reads the weight at 16-47% of HBM's rate at 1 and 16 rows alike (gate_up 58 us), where
# dequantizing costs 5 bytes a weight (1 in, 2 out, 2 read by cuBLAS: ~140 us for gate_up), so decode keeps it.
DEQUANT_MIN_M = 17
# Rows of x up to which 8-bit weights take the byte-codes GEMV (kernels/codes_gemv.py). H200, Llama-8B at one row:
# scaled by row qkv 15.5 / o 14.3 / gate_up 39.1 / down 44.8 us against this kernel's 26.9 / 24.3 / 49.0 / 80.4;
# GPTQ groups of 128 20.5 / 19.0 / 51.9 / 62.7 against 31.3 / 27.5 / 63.4 / 91.3. At 4 rows a tie a layer (177
# against 181 us: gate_up loses 90 to 49).
GEMV_MAX_M = 1


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None = None, group: int = 0
                    ) -> torch.Tensor:  # fmt: skip
    """The fp32 ``[N, K]`` weight: ``weight * scale[:, None]`` (per row), or with ``group`` ``(weight - zeros) *
    scale`` per ``[N, K / group]`` group."""
    if not group:
        return weight.float() * scale.float()[:, None]
    w = weight.float() - (zeros.float().repeat_interleave(group, 1) if zeros is not None else 0.0)
    return w * scale.float().repeat_interleave(group, 1)


def int8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                    zeros: torch.Tensor | None = None, group: int = 0) -> torch.Tensor:  # fmt: skip
    """Reference: dequantize the whole weight, fp32 matmul, x's dtype out."""
    out = x.float() @ dequantize_int8(weight, scale, zeros, group).t()
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
def _int8_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, partial_ptr, counter_ptr, M, N, K, k_per_split,
                      split_k, stride_xm, stride_wn, stride_sn, stride_om, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      SPLIT: tl.constexpr = False, GROUP: tl.constexpr = 0, ZEROS: tl.constexpr = False):  # fmt: skip
    """``out = (x @ weight^T) * scale`` over K steps of ``BLOCK_K`` (K a multiple of it); ``GROUP`` (a multiple of
    ``BLOCK_K``): ``scale`` and, with ``ZEROS``, the zero points ``[N, K / GROUP]``, each step's product scaled by
    its group's. ``SPLIT``: K shared out as ``kernels/fp8_block_gemm.py``'s decode launch does (each split's
    partial product scaled alike, so the sum is the same)."""
    pid_n, pid_k, offs_m, offs_n, m_live, n_live = output_tile(M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=m_live[:, None], other=0.0)
        w = tl.load(w_ptrs + k0, mask=n_live[:, None], other=0)
        if GROUP:
            s_at = offs_n * stride_sn + k0 // GROUP
            if ZEROS:  # q - zero: integers of at most 9 bits, exact in x's dtype
                w = w.to(tl.float32) - tl.load(z_ptr + s_at, mask=n_live, other=0.0)[:, None]
            step = tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
            acc += step * tl.load(s_ptr + s_at, mask=n_live, other=0.0)[None, :]
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    if not GROUP:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_live, other=0.0)[None, :]
    if SPLIT:
        store_split_partial(acc, out_ptr, partial_ptr, counter_ptr, pid_n, pid_k, split_k, M, N, stride_om, True)
    else:
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_live[:, None] & n_live[None, :])


def int8_gemm_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None = None,
                     group: int = 0) -> torch.Tensor:  # fmt: skip
    """The Triton kernel: ``x [..., K]`` (fp16 / bf16 / fp32) times the 8-bit ``weight [N, K]`` (K a multiple of
    32) with fp32 ``scale [N]``, or with ``group`` (a multiple of 32) ``scale`` / ``zeros [N, K / group]``, in x's
    dtype."""
    n, k = weight.shape
    step = 64 if k % 64 == 0 and (not group or group % 64 == 0) else 32

    def launch(grid, x2, out, partials, counters, m, k_per_split, split_k, **meta):
        _int8_gemm_kernel[grid](x2, weight, scale, zeros if zeros is not None else scale, out, partials, counters,
                                m, n, k, k_per_split, split_k, x2.stride(0), weight.stride(0),
                                scale.stride(0) if group else 0, out.stride(0), GROUP=group,
                                ZEROS=zeros is not None, **meta)  # fmt: skip

    return launch_weight_tiles(x, n, k, lambda m: step, launch)


def int8_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None = None,
                       group: int = 0) -> torch.Tensor:  # fmt: skip
    """The CUDA path by rows of x: the byte-codes GEMV up to ``GEMV_MAX_M`` rows, the tile kernel up to
    ``DEQUANT_MIN_M - 1``, and past them the weight dequantized for one cuBLAS GEMM."""
    k = weight.shape[1]
    rows = x.numel() // k
    if rows >= DEQUANT_MIN_M:
        return codes_dequant_gemm(x, weight, scale, four_bit=False, group=group, zeros=zeros)
    if rows <= GEMV_MAX_M and gemv_fits(k, False, group):
        return codes_gemv(x, weight, scale, four_bit=False, group=group, zeros=zeros)
    return int8_gemm_triton(x, weight, scale, zeros, group)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                zeros: torch.Tensor | None = None, group: int = 0, backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """``x @ W^T (+ bias)`` (:func:`dequantize_int8`'s W): on CUDA :func:`int8_linear_triton`, the reference
    otherwise."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    k = weight.shape[1]
    if not use_triton(x, backend) or x.dtype not in dtypes or k % 32 or group % 32:
        return int8_linear_ref(x, weight, scale, bias, zeros, group)
    out = int8_linear_triton(x, weight, scale, zeros, group)
    return out + bias if bias is not None else out
