"""The e4m3 activation-quantization formula, shared by every kernel that quantizes activations per token (the
quantize kernel, the W8A8 GEMMs that quantize their input, the RMSNorm and SiLU-and-mul fused outputs), so they all
give the same bits: ``x * (1 / scale)``, as vLLM's quantization kernels compute it. One reciprocal per row and a
multiply per value, where ``x / scale`` is a division per value (a GEMM that quantizes x inside its loop pays it on
every value of every step)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # an all-zero row still gets a finite scale


@triton.jit
def e4m3_row_scale(amax, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """A row's dynamic per-token scale from its absmax (``kernels/fp8_linear.py: quantize_activations``' formula)."""
    return tl.maximum(amax / FP8_MAX, MIN_SCALE)


@triton.jit
def to_e4m3(x, scale, FP8_MAX: tl.constexpr):
    """fp32 ``x * (1 / scale)`` clamped to e4m3's range and rounded to e4m3 (``scale`` a row's scalar or column,
    so the reciprocal is taken once per row)."""
    return tl.minimum(tl.maximum(x * (1.0 / scale), -FP8_MAX), FP8_MAX).to(tl.float8e4nv)


@triton.jit
def row_scales(x_ptrs, K, offs_k, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """Dynamic per-token scales of the rows ``x_ptrs`` (``[BLOCK_M, BLOCK_K]`` pointers at K offset 0) point at,
    from one pass over their whole width: for a GEMM that quantizes its activations tile by tile (x is a few KB,
    in L2), whatever part of K the program walks."""
    amax = tl.zeros(x_ptrs.shape, dtype=tl.float32)
    for k0 in range(0, K, x_ptrs.shape[1]):
        xv = tl.load(x_ptrs + k0, mask=(k0 + offs_k < K)[None, :], other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(xv))
    return e4m3_row_scale(tl.max(amax, axis=1), FP8_MAX, MIN_SCALE)
