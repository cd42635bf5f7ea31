"""bitsandbytes 4-bit weights (NF4 / FP4, as transformers saves ``load_in_4bit`` models): each weight is a code
into a 16-value codebook (the checkpoint's ``quant_map``), two codes a byte (the high nibble first), times the absmax
of its block of ``blocksize`` consecutive weights of the row-major ``[N, K]`` matrix: ``W[n, k] =
codebook[code] * absmax[n, k // blocksize]`` (with K a multiple of the block, each block lies in one row). NVFP4
weights are the same form (``core/layers/quantization/nvfp4.py``): the e2m1 values as the codebook, each block of 16's
fp8 scale as its absmax and the tensor's global scale a row scale applied to the product.

The codebook is not affine (NF4's values are normal quantiles), so the int4 kernels' ``(q - z) * s`` form does not
hold it. Decode rows take the byte-codes GEMV (``kernels/codes_gemv.py``: each byte's two codes looked up in the
codebook, fp32 sums), more rows the weight dequantized for one cuBLAS GEMM (``kernels/codes_dequant.py``). A
``tl.dot`` tile kernel served both before; on an H100 it read a Llama-8B gate_up at 2% of the bandwidth (798 us at
one to sixteen rows, against 97-106 for the GEMV's first version; RESULTS.md) and was removed. The fused MoE
kernel's codebook experts share its block scales (``step_scales``). :func:`bnb4_linear_ref` is the reference.
"""

from __future__ import annotations

import torch

from kernels.backend import use_triton
from kernels.codes_dequant import codes_dequant_gemm
from kernels.codes_gemv import GEMV_MAX_M, codes_gemv, gemv_fits

# bitsandbytes' NF4 codebook (``create_normal_map``): what ``--quantization bitsandbytes`` quantizes to at load
NF4_CODEBOOK = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0)  # fmt: skip


# NVFP4's e2m1 values by code (sign bit 3, two exponent bits, one mantissa bit): the codebook its weights look up
E2M1_CODEBOOK = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def unpack_codes(weight: torch.Tensor) -> torch.Tensor:
    """``[N, K / 2]`` bytes -> ``[N, K]`` codes (0..15): element ``2b`` is byte ``b``'s high nibble, ``2b + 1`` its
    low one."""
    return torch.stack([weight >> 4, weight & 15], -1).reshape(weight.shape[0], -1).long()


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """:func:`unpack_codes`' inverse: ``[N, K]`` codes -> ``[N, K / 2]`` uint8."""
    pairs = codes.reshape(codes.shape[0], -1, 2).to(torch.uint8)
    return (pairs[..., 0] << 4) | pairs[..., 1]


def dequantize_bnb4(weight: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, blocksize: int,
                    row_scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The fp32 ``[N, K]`` weight of ``weight [N, K / 2]`` (uint8), ``absmax [N, K / blocksize]`` (fp32, or NVFP4's
    fp8 block scales), ``codebook [16]`` and ``row_scale [N]`` (NVFP4's global scale; None: 1)."""
    values = codebook.float()[unpack_codes(weight)] * absmax.float().repeat_interleave(blocksize, 1)
    return values if row_scale is None else values * row_scale.float()[:, None]


def quantize_bnb4(weight: torch.Tensor, blocksize: int = 64, codebook: tuple[float, ...] = NF4_CODEBOOK
                  ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``[N, K]`` -> (``[N, K / 2]`` uint8 codes, fp32 ``[N, K / blocksize]`` absmax): each value divided by its
    block's absmax and rounded to the nearest codebook entry, as bitsandbytes' ``quantize_4bit`` does."""
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // blocksize, blocksize)
    absmax = blocks.abs().amax(-1).clamp(min=1e-12)
    table = torch.tensor(codebook, device=weight.device)
    scaled = blocks / absmax[..., None]
    if all(a < b for a, b in zip(codebook, codebook[1:])):  # sorted (NF4): the nearest code by its midpoints
        codes = torch.bucketize(scaled, (table[1:] + table[:-1]) / 2)
    else:
        codes = (scaled[..., None] - table).abs().argmin(-1)
    return pack_codes(codes.reshape(n, k)), absmax


def bnb4_linear_ref(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                    blocksize: int, bias: torch.Tensor | None = None,
                    row_scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Reference: dequantize the whole weight, fp32 matmul, x's dtype out."""
    out = x.float() @ dequantize_bnb4(weight, absmax, codebook, blocksize, row_scale).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def bnb4_gemm_triton(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                     blocksize: int, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path: ``x [..., K]`` (fp16 / bf16 / fp32) times the 4-bit ``weight [N, K / 2]``, in x's dtype: the
    byte-codes decode GEMV for up to ``GEMV_MAX_M`` rows, past them the weight dequantized for one cuBLAS GEMM. K must
    be a multiple of 32 and the block of 16."""
    k = weight.shape[1] * 2
    formats = dict(four_bit=True, group=blocksize, codebook=codebook, row_scale=row_scale)
    if x.numel() // k <= GEMV_MAX_M and gemv_fits(k, True, blocksize):
        return codes_gemv(x, weight, absmax, **formats)
    return codes_dequant_gemm(x, weight, absmax, **formats)


def bnb4_linear(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, blocksize: int,
                bias: torch.Tensor | None = None, *, backend: str = "auto",
                row_scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``x @ W^T (+ bias)``: :func:`bnb4_gemm_triton` on CUDA, the reference otherwise."""
    k = weight.shape[1] * 2
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if not use_triton(x, backend) or x.dtype not in dtypes or k % 32 or blocksize % 16:
        return bnb4_linear_ref(x, weight, absmax, codebook, blocksize, bias, row_scale)
    out = bnb4_gemm_triton(x, weight, absmax, codebook, blocksize, row_scale)
    return out + bias if bias is not None else out
