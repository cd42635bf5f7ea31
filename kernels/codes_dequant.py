"""Byte-code weights (4-bit codebook: bitsandbytes NF4 / FP4, NVFP4, GGUF IQ4; 8-bit: bitsandbytes, GPTQ,
compressed-tensors) dequantized into the device's dense-weight scratch buffer, then one cuBLAS GEMM: the path for
more rows of x than the decode GEMV takes (``kernels/codes_gemv.py``).

Why: the formats' tile kernels (``bnb4_gemm``, ``int8_gemm``) dequantize each ``[BLOCK_N, BLOCK_K]`` tile in the K
loop and multiply it on 16-row or 64-row ``tl.dot`` tiles; on an H100 a Llama-8B gate_up in NF4 took 807 us at 16
rows (2% of the weight read). Here the weight is written once in x's dtype (2 bytes a weight out, 0.5-1 in) and
cuBLAS reads it at its own speed, as the int4 path does past 16 rows (``kernels/int4_gemm.py``) and as
bitsandbytes itself does for more than one row.

The weight each element gets is the formats' reference dequantization rounded once to x's dtype:
``codebook[code] * absmax (* row scale)``, ``q * scale`` (per row), ``(q - zero) * scale`` (per group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.codes_gemv import load_codebook, look_up
from kernels.dense_scratch import dense_weight_scratch


@triton.jit
def _codes_dequant_kernel(w_ptr, s_ptr, z_ptr, codebook_ptr, row_scale_ptr, out_ptr, N, K, stride_wn, stride_sn,
                          FOUR_BIT: tl.constexpr, GROUP: tl.constexpr, ZEROS: tl.constexpr,
                          ROW_SCALES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
    """Program (n, b): rows ``n * BLOCK_N`` on, bytes ``b * BLOCK_B`` on of each, written as their weights into
    ``out [N, K]`` (4-bit: two weights a byte, the high nibble first). The scale groups as ``codes_gemv``'s."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    safe_rows = tl.minimum(rows, N - 1).to(tl.int64)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    codes = tl.load(w_ptr + safe_rows[:, None] * stride_wn + offs_b[None, :])
    s_rows = s_ptr + safe_rows * stride_sn
    if FOUR_BIT:
        byte = codes.to(tl.int32)
        scale = tl.load(s_rows[:, None] + offs_b[None, :] // (GROUP // 2)).to(tl.float32)
        codebook = load_codebook(codebook_ptr)
        first = look_up(codebook, byte >> 4) * scale
        second = look_up(codebook, byte & 15) * scale
        if ROW_SCALES:  # after the block scale, as the reference rounds
            row = tl.load(row_scale_ptr + safe_rows).to(tl.float32)[:, None]
            first, second = first * row, second * row
        values = tl.interleave(first, second)  # [BLOCK_N, 2 BLOCK_B]: the row's weights in order
        offs_k = tl.program_id(1) * 2 * BLOCK_B + tl.arange(0, 2 * BLOCK_B)
    else:
        values = codes.to(tl.float32)
        if GROUP > 0:
            at = safe_rows[:, None] * stride_sn + offs_b[None, :] // GROUP
            if ZEROS:
                values = values - tl.load(z_ptr + at).to(tl.float32)
            values = values * tl.load(s_ptr + at).to(tl.float32)
        else:
            values = values * tl.load(s_ptr + safe_rows).to(tl.float32)[:, None]
        offs_k = offs_b
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(out_ptrs, values.to(out_ptr.dtype.element_ty), mask=live[:, None])


def dequantize_codes_into_scratch(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, *, four_bit: bool,
                                  group: int, codebook: torch.Tensor | None = None,
                                  zeros: torch.Tensor | None = None,
                                  row_scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``W [N, K]`` in ``dtype`` (in the dense-weight scratch buffer) from ``codes_gemv``'s arguments."""
    n, row_bytes = weight.shape
    k = row_bytes * 2 if four_bit else row_bytes
    out = dense_weight_scratch(weight.device, dtype, n, k)
    block_b = next(b for b in (128, 64, 32, 16) if row_bytes % b == 0)
    block_n = 32
    _codes_dequant_kernel[(triton.cdiv(n, block_n), row_bytes // block_b)](
        weight, scale, zeros if zeros is not None else scale, codebook if codebook is not None else scale,
        row_scale if row_scale is not None else scale, out, n, k, weight.stride(0),
        scale.stride(0) if scale.dim() == 2 else 0, FOUR_BIT=four_bit, GROUP=group, ZEROS=zeros is not None,
        ROW_SCALES=row_scale is not None, BLOCK_N=block_n, BLOCK_B=block_b, num_warps=4,
    )  # fmt: skip
    return out


def codes_dequant_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, **formats) -> torch.Tensor:
    """``x [..., K] @ W^T`` for many rows: the weight dequantized once (:func:`dequantize_codes_into_scratch`, with
    ``four_bit``, ``group``, ``codebook``, ``zeros``, ``row_scale`` as there), then the dense GEMM."""
    return F.linear(x, dequantize_codes_into_scratch(weight, scale, x.dtype, **formats))
