"""The e4m3 activation-quantization formula, shared by every kernel that quantizes activations per token (the
quantize kernel, the W8A8 GEMMs that quantize their input, the RMSNorm and SiLU-and-mul fused outputs), so they all
give the same bits."""

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
    """fp32 ``x / scale`` clamped to e4m3's range and rounded to e4m3."""
    return tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX).to(tl.float8e4nv)
