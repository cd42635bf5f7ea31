"""FP8 (e4m3) linear layers: weights quantized per output channel, activations per token.

Two paths on the GPU, by the number of rows M:

- M > 16 (prefill, large decode batches): W8A8. One Triton kernel quantizes each activation row (dynamic per-token
  scale, or the checkpoint's static per-tensor scale), then ``torch._scaled_mm`` (cuBLASLt/CUTLASS row-wise scaling
  on Hopper and Ada) multiplies fp8 by fp8 with one fp32 scale per activation row and per weight row, bf16 out.
- M <= 16 (decode): the GEMM is a pass over the weight, so its floor is the weight's bytes; the Triton skinny kernel
  reads the fp8 weight, widens it in registers and multiplies it with the unquantized activations (w8a16: no
  activation quantization to launch, and no activation rounding), scaling each output channel once at the end.
  Two kernels: for M <= 4 the CUDA-core ``fma`` kernel of ``kernels/skinny_gemm.py`` (its tile loaders and
  register double buffer, reused here) reading the fp8 bits with 16-byte loads (16 elements, so wider ``block_k``
  than bf16 for the same bytes in flight), widening them to fp32 in registers; configs per shape in
  ``FP8_SKINNY_CONFIGS`` / ``FP8_DEFAULT_CONFIGS`` (measured by ``benchmarks/bench_quant_gemm.py --sweep``). For
  M of 5..16 (or a shape whose config is None) x is padded to 16 rows for ``tl.dot``; output blocks are narrow
  enough to give every SM work, and only small layers split K (``kernels/split_k.py``).
  Those two are instruction-bound on the per-weight widening (43-56% of HBM bandwidth on the H200). The third,
  ``mma`` / ``mmq`` (W8A8, any M <= 16, chosen only where a measured table entry says so): activations quantized
  per token to e4m3 (``mma``: one small launch before; ``mmq``: inside the GEMM kernel), then ``_fp8_mma_kernel`` feeds both fp8 tiles to the tensor cores as they are (sm_90:
  wgmma ``QGMMA.64x16x32``, the weight tile as the 64-row side), fp32 accumulation, ``x_scale[m] * w_scale[n]``
  at the end: the loop has no conversion (``benchmarks/fp8_gemm_sass.py``: ~24 warp instructions per 1000 weights
  against the fma kernel's ~160), and its numerics are the prefill path's (``fp8_linear_ref``).
  ``msk`` runs the same W8A8 product as one persistent stream-K launch (``kernels/fp8_stream_k.py``); measured,
  it won no Llama-8B shape (``kernels/NOTES.md``), so no table entry names it today.

On GPUs with Gluon and fp8 mma.sync (compute capability 8.9+), M <= 8 goes to the Gluon GEMV first
(``kernels/fp8_gemv_gluon.py``, W8A8 with the activations quantized upstream, or in the kernel where a config says
so): each thread loads its own mma fragments of the weight, 16 bytes at a time, at 93% of what a read-only kernel
reaches per GEMM (Llama-8B M = 1 on the H200: down 18.7 us against the ``mma`` kernel's 25.9).
``FP8_GEMV_CONFIGS`` / ``FP8_GEMV_DEFAULT`` pick its shape; the Triton kernels below take what it does not serve.

``fp8_linear_ref`` (quantize the activations like the W8A8 path, dequantize, fp32 matmul) is the CPU path and the
reference of the W8A8 path; ``fp8_weight_only_ref`` is the skinny kernel's. Kernels take fp8 tensors as uint8 views
(the bits), which the Triton interpreter can also read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.fp8_gemv_gluon import (
    HAS_GLUON,
    GemvConfig,
    gemv_supported,
    gluon_fp8_gemv,
    gluon_fp8_gemv_rope_cache,
    gluon_fp8_gemv_silu_mul,
)
from kernels.fp8_quant import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, e4m3_row_scale, row_scales, to_e4m3
from kernels.fp8_stream_k import fp8_stream_k_gemm
from kernels.gemv_rows_gluon import RowNorm, rope_cache_supported, silu_mul_supported
from kernels.pdl import launch_options, use_pdl, wait_then_release
from kernels.skinny_gemm import (
    SkinnyConfig,
    _c,
    _fma_tile,
    _load_w_tile,
    _prefetch_l2,
    _x_row_ptrs,
    m_bucket,
    prefetch_two_tiles,
)
from kernels.split_k import decode_launch, split_workspace, store_split_partial, tensor_core_split_k


class Fp8Activations(NamedTuple):
    """Activations with their per-token e4m3 quantization (``quantize_activations``' result), made by the kernel
    that produced them (``kernels/rmsnorm.py: rms_norm_fp8``), so a W8A8 GEMM reading them skips its own
    quantization launch. Layers that cannot use ``xq`` read ``x``."""

    x: torch.Tensor
    xq: torch.Tensor  # e4m3 [M, K]
    scale: torch.Tensor  # fp32 [M, 1]


class NormedRows(NamedTuple):
    """Rows an RMSNorm is still to be applied to (``norm``: its weight, eps and the residual add), for a GEMM that
    norms and quantizes them in its own launch (the Gluon GEMV's RMSNorm prologue: ``fp8_qkv_rope_cache``,
    ``fp8_gate_up_silu``). Where it serves them, ``norm.residual_out`` holds ``x + residual`` after the launch."""

    x: torch.Tensor
    norm: RowNorm


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` weight -> (fp8 weight, fp32 scale per output row), ``weight ~= q * scale[:, None]``."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_activations(x: torch.Tensor, static_scale: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``[M, K]`` activations -> (fp8 activations, fp32 ``[M, 1]`` scales): dynamic per-token, or ``static_scale``
    (a per-tensor scale from the checkpoint) for every row."""
    xf = x.float()
    if static_scale is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    else:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return (xf * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: quantize x like the GEMM path, dequantize both operands, fp32 matmul, x's dtype out."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, x_scale = quantize_activations(x2, input_scale)
    w = weight.float() * weight_scale.float().reshape(-1, 1)
    out = F.linear(xq.float() * x_scale, w, None if bias is None else bias.float())
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def fp8_weight_only_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of the skinny kernel: unquantized activations times the dequantized weight, fp32, x's dtype out."""
    w = weight.float() * weight_scale.float().reshape(-1, 1)
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, static_scale_ptr, K, stride_x, FP8_MAX: tl.constexpr,
                          MIN_SCALE: tl.constexpr, STATIC: tl.constexpr, BLOCK: tl.constexpr,
                          USE_PDL: tl.constexpr = False):  # fmt: skip
    """One program per row: its absmax (unless the scale is static), then the row in fp8 (as uint8 bits)."""
    wait_then_release(USE_PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    if STATIC:
        scale = tl.load(static_scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = e4m3_row_scale(tl.max(amax, axis=0), FP8_MAX, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = to_e4m3(x, scale, FP8_MAX)
        tl.store(q_ptr + row * K + k0 + offs, q.to(tl.uint8, bitcast=True), mask=mask)


def quantize_activations_triton(x: torch.Tensor, static_scale: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The Triton version of :func:`quantize_activations` (one launch): 2-D ``x`` with unit column stride."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.uint8, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = min(4096, triton.next_power_of_2(k))
        _quantize_rows_kernel[(m,)](x, q, scale, scale if static_scale is None else static_scale, k, x.stride(0),
                                    FP8_MAX=FP8_MAX, MIN_SCALE=FP8_MIN_SCALE, STATIC=static_scale is not None,
                                    BLOCK=block, num_warps=4, **launch_options(use_pdl(x)))
    return q.view(FP8_DTYPE), scale


@triton.jit
def _fp8_skinny_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, k_per_split, stride_xm, stride_om, stride_os,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       IEEE: tl.constexpr):  # fmt: skip
    """``out[split] = x[:, split's K] @ dequant(w[:, split's K])^T`` in fp32; w is ``[N, K]`` fp8 bits (uint8)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w_bits = tl.load(w_ptr + offs_n[None, :] * K + kk[:, None], mask=n_mask[None, :] & k_mask[:, None], other=0)
        w = w_bits.to(tl.float8e4nv, bitcast=True).to(x.dtype)
        if IEEE:  # fp32 activations (CPU-path dtypes, tests): no TF32 rounding on the GPU
            acc += tl.dot(x, w, out_dtype=tl.float32, input_precision="ieee")
        else:
            acc += tl.dot(x, w, out_dtype=tl.float32)
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    acc = acc * scale[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def fp8_skinny_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *, block_n: int | None = None,
                    block_k: int = 256, split_k: int | None = None, num_warps: int = 4) -> torch.Tensor:  # fmt: skip
    """``x [M <= 16, K] @ (weight [N, K] fp8 * weight_scale[:, None])^T`` in x's dtype (the decode path). Block
    sizes and ``split_k`` default to ``decode_launch``'s choice; tests pass their own."""
    m, k = x.shape
    n = weight.shape[0]
    if m > 16:
        raise ValueError(f"fp8_skinny_gemm takes at most 16 rows, got {m}.")
    k_blocks = triton.cdiv(k, block_k)
    if block_n is None or split_k is None:
        auto_n, auto_split = decode_launch(n, k_blocks, x.device.index if x.is_cuda else None)
        block_n, split_k = block_n or auto_n, split_k or auto_split
    n_blocks = triton.cdiv(n, block_n)
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty((split_k, m, n) if split_k > 1 else (m, n), dtype=torch.float32 if split_k > 1 else x.dtype,
                      device=x.device)
    _fp8_skinny_kernel[(n_blocks, split_k)](
        x, weight.view(torch.uint8), weight_scale, out, m, n, k, k_per_split, x.stride(0), n,
        out.stride(0) if split_k > 1 else 0, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32, num_warps=num_warps,
    )
    return out if split_k == 1 else out.sum(0).to(x.dtype)


# ------------------------------------------------------------------------------- fma kernel (M <= 4, CUDA cores)

# Exact shapes: (m_bucket, N, K) -> config for M <= 16: an ``fma`` config (w8a16 on the CUDA cores, M <= 4 only) or
# an ``mma`` one (W8A8: per-token e4m3 activations, fp8 tensor cores); None sends the shape to the tl.dot kernel.
# Paste the block printed by ``benchmarks/bench_quant_gemm.py --sweep`` (on the H200) here; unlisted shapes use
# FP8_DEFAULT_CONFIGS.
FP8_SKINNY_CONFIGS: dict[tuple[int, int, int], SkinnyConfig | None] = {  # H200, 2026-12-03, Llama-3.1-8B, M = 1
    (1, 6144, 4096): _c("mma:64x256:w4:s3:k4"),  # qkv: mma 13.4 us, fma 14.0, mmq 16.1, tl.dot 21.9, scaled_mm 22.9
    # o_proj: fma 9.5 us, mma 10.9, mmq 13.5, tl.dot 16.1, scaled_mm 19.1. Eighteenth session: all 8 tiles loaded
    # before the PDL wait (the whole weight in registers across the GPU while attention runs), W3-fp8 2.56 against
    # 2.67 ms a step with 1 tile (4 tiles 2.59; 32 x 256 x 16 warps, 16 tiles, 2.58)
    (1, 4096, 4096): _c("fma:16x512:w8:p0:r8"),
    (1, 28672, 4096): _c("mma:128x256:w4:s3"),  # gate_up: mma 39.7 us, fma 48.9, mmq 43.9, tl.dot 51.1, scaled_mm 56.0
    (1, 4096, 14336): _c("mma:128x256:w8:s4:k4"),  # down: mma 25.8 us, fma 26.2, mmq 34.3, tl.dot 48.6, scaled_mm 47.3
}
# Per M bucket, sized for 1-byte elements: one 16-byte load is 16 weights, so a [block_n, block_k] tile holds twice
# the bf16 kernel's elements per byte; 16-32 weights (1-2 loads) per thread per tile keep the M fp32 accumulator
# tiles (block_n * block_k / threads registers each) within ~128 registers.
FP8_DEFAULT_CONFIGS: dict[int, SkinnyConfig | None] = {
    1: _c("fma:16x512:w8:p0"),  # measured: best geo-mean over the Llama-3.1-8B layer shapes (21.6 us)
    2: _c("fma:4x512:w4:p0"),  # 16 per thread: two accumulator tiles
    4: _c("fma:4x512:w4:p0"),  # 16 per thread: four accumulator tiles
}
FMA_MAX_M = 4


def pick_fp8_config(m: int, n: int, k: int) -> SkinnyConfig | None:
    """The decode configuration for this shape (``fma`` for M <= 4, ``mma`` wherever a table entry says so), or None
    for the tl.dot kernel."""
    bucket = m_bucket(m)
    key = (bucket, n, k)
    config = FP8_SKINNY_CONFIGS[key] if key in FP8_SKINNY_CONFIGS else FP8_DEFAULT_CONFIGS.get(bucket)
    if config is not None and config.kind == "fma" and m > FMA_MAX_M:
        return None
    return config


@triton.jit
def _e4m3_byte_to_f32(words, byte: tl.constexpr):
    return ((words >> (8 * byte)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _fp8_bits_to_f32(bits, USE_PTX: tl.constexpr):
    """``[BN, BK]`` e4m3 bits (uint8) -> fp32, four bytes at a time from the 32-bit registers the 16-byte load
    filled (the byte sum below folds back into those registers): on the GPU (``USE_PTX``) two
    ``cvt.rn.f16x2.e4m3x2`` and four f16 -> f32 per word. Triton's own cast splits the bytes into one register each
    and re-packs pairs for the same cvt (~3 more instructions per weight). The interpreter extracts each byte."""
    bn: tl.constexpr = bits.shape[0]
    bk: tl.constexpr = bits.shape[1]
    words = tl.reshape(bits, (bn, bk // 4, 4), can_reorder=False).to(tl.uint32)
    words = tl.sum(words << (tl.arange(0, 4) * 8).to(tl.uint32)[None, None, :], axis=2).to(tl.int32, bitcast=True)
    if USE_PTX:
        w0, w1, w2, w3 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b16 lo, hi, a, b, c, d;
            .reg .b32 h01, h23;
            mov.b32 {lo, hi}, $4;
            cvt.rn.f16x2.e4m3x2 h01, lo;
            cvt.rn.f16x2.e4m3x2 h23, hi;
            mov.b32 {a, b}, h01;
            mov.b32 {c, d}, h23;
            cvt.f32.f16 $0, a;
            cvt.f32.f16 $1, b;
            cvt.f32.f16 $2, c;
            cvt.f32.f16 $3, d;
            }""",
            constraints="=f,=f,=f,=f,r", args=[words], dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True, pack=1)
    else:
        w0 = _e4m3_byte_to_f32(words, 0)
        w1 = _e4m3_byte_to_f32(words, 1)
        w2 = _e4m3_byte_to_f32(words, 2)
        w3 = _e4m3_byte_to_f32(words, 3)
    # join adds a minor dim: [bn, bk / 4, 2, 2] with [.., p, q] = (w0, w2 | w1, w3)[p] of column q = byte 2p + q
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (bn, bk), can_reorder=False)


@triton.jit
def _store_scaled_row(out_ptr, m, M, stride_om, acc, scale, rows, N):
    y = tl.sum(acc, axis=1) * scale
    n_valid = tl.where(m < M, N, 0)  # (rows < N) & (m < M), in a form the interpreter takes too
    tl.store(out_ptr + m * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=rows < n_valid)


@triton.jit
def _fp8_fma_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr,
    PF_COLS: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_PTX: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    PRELOAD: tl.constexpr = 1,
):  # fmt: skip
    """Program (n, m): out[m*BLOCK_M : +BLOCK_M, n*BLOCK_N : +BLOCK_N] = x @ (w bits -> e4m3 -> fp32)^T * scale,
    the bf16 ``_skinny_fma_kernel``'s loop (unmasked 16-byte weight loads, tile t+1 in flight while tile t is
    multiplied) with the weight widened in registers and the channel scale applied once to the reduced sums.
    ``PRELOAD`` > 1 (at most the tile count): that many tiles' bits are loaded before the PDL wait, held as they
    came (one tuple entry per tile, unrolled), and widened and multiplied after it; the rest follow unpipelined.
    With the whole weight in registers across the GPU, the layer's bytes stream while the kernel before it runs."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = tl.minimum(rows, N - 1).to(tl.int64) * stride_wn
    w_ptrs = w_ptr + w_rows[:, None] + offs_k[None, :]
    num_tiles = tl.cdiv(K, BLOCK_K)
    if PREFETCH > 0:  # PF_COLS addresses per tile row: one per 128-byte line
        l2_ptrs = w_ptr + w_rows[:, None] + (tl.arange(0, PF_COLS) * (BLOCK_K // PF_COLS))[None, :]
        for t in tl.static_range(PREFETCH):
            _prefetch_l2(l2_ptrs + tl.minimum(t, num_tiles - 1) * BLOCK_K)
    if PRELOAD > 1:
        tiles = ()
        for t in tl.static_range(PRELOAD):
            tiles = tiles + (_load_w_tile(w_ptrs, t * BLOCK_K, K, offs_k, EVEN_K),)
    else:
        w = _load_w_tile(w_ptrs, 0, K, offs_k, EVEN_K)
    scale = tl.load(scale_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)  # not the program's tail
    wait_then_release(USE_PDL)  # everything above touched only the weight, which no kernel writes

    m0 = tl.program_id(1) * BLOCK_M
    x0_ptr, x1_ptr, x2_ptr, x3_ptr = _x_row_ptrs(x_ptr, m0, M, stride_xm)
    row_zeros = tl.zeros([BLOCK_N], dtype=tl.int32)
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PRELOAD > 1:
        for t in tl.static_range(PRELOAD):
            acc0, acc1, acc2, acc3 = _fma_tile(acc0, acc1, acc2, acc3, _fp8_bits_to_f32(tiles[t], USE_PTX), x0_ptr,
                                               x1_ptr, x2_ptr, x3_ptr, t * BLOCK_K, K, offs_k, row_zeros, BLOCK_M,
                                               EVEN_K)  # fmt: skip
        for t in range(PRELOAD, num_tiles):
            w = _load_w_tile(w_ptrs, t * BLOCK_K, K, offs_k, EVEN_K)
            acc0, acc1, acc2, acc3 = _fma_tile(acc0, acc1, acc2, acc3, _fp8_bits_to_f32(w, USE_PTX), x0_ptr, x1_ptr,
                                               x2_ptr, x3_ptr, t * BLOCK_K, K, offs_k, row_zeros, BLOCK_M, EVEN_K)
    else:
        for t in range(1, num_tiles):
            if PREFETCH > 0:
                _prefetch_l2(l2_ptrs + tl.minimum(t + PREFETCH - 1, num_tiles - 1) * BLOCK_K)
            w_next = _load_w_tile(w_ptrs, t * BLOCK_K, K, offs_k, EVEN_K)
            acc0, acc1, acc2, acc3 = _fma_tile(acc0, acc1, acc2, acc3, _fp8_bits_to_f32(w, USE_PTX), x0_ptr, x1_ptr,
                                               x2_ptr, x3_ptr, (t - 1) * BLOCK_K, K, offs_k, row_zeros, BLOCK_M,
                                               EVEN_K)  # fmt: skip
            w = w_next
        acc0, acc1, acc2, acc3 = _fma_tile(acc0, acc1, acc2, acc3, _fp8_bits_to_f32(w, USE_PTX), x0_ptr, x1_ptr,
                                           x2_ptr, x3_ptr, (num_tiles - 1) * BLOCK_K, K, offs_k, row_zeros, BLOCK_M,
                                           EVEN_K)  # fmt: skip

    _store_scaled_row(out_ptr, m0, M, stride_om, acc0, scale, rows, N)
    if BLOCK_M > 1:
        _store_scaled_row(out_ptr, m0 + 1, M, stride_om, acc1, scale, rows, N)
    if BLOCK_M > 2:
        _store_scaled_row(out_ptr, m0 + 2, M, stride_om, acc2, scale, rows, N)
        _store_scaled_row(out_ptr, m0 + 3, M, stride_om, acc3, scale, rows, N)


def fma_preload(config: SkinnyConfig, k: int) -> int:
    """Tiles an fma program loads before its PDL wait: the config's ``preload``, at most the tile count. (Without
    PDL the same loads merely go out before any math.)"""
    return min(config.preload, triton.cdiv(k, config.block_k))


def fp8_fma_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, config: SkinnyConfig
                 ) -> torch.Tensor:  # fmt: skip
    """``x [M, K] @ (weight [N, K] fp8 * weight_scale[:, None])^T`` in x's dtype on the CUDA cores (an ``fma``
    config; any M, 4 rows of x per program, but meant for M <= 4). ``x``: rows with unit column stride."""
    if config.kind != "fma":
        raise ValueError(f"fp8_fma_gemm takes an fma config, got {config}")
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"fp8 weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    bits = weight.view(torch.uint8)
    if bits.stride(1) != 1:
        bits = bits.contiguous()
    block_m = min(4, m_bucket(m))
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, block_m))
    _fp8_fma_kernel[grid](
        x, bits, weight_scale, out, m, n, k, x.stride(0), bits.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        PREFETCH=config.prefetch if x.is_cuda else 0, PF_COLS=max(1, config.block_k // 128),
        EVEN_K=k % config.block_k == 0, USE_PTX=x.is_cuda, num_warps=config.num_warps,
        num_stages=1, PRELOAD=fma_preload(config, k), **launch_options(use_pdl(x)),
    )  # fmt: skip
    return out


# The Gluon decode GEMM (kernels/fp8_gemv_gluon.py, W8A8, M <= 8) on GPUs where it runs: configs per (N, K), else
# FP8_GEMV_DEFAULT; None (or GEMV_ENABLED off) sends the shape to the Triton kernels' tables above. Rows that come
# unquantized (no ``Fp8Activations``, e.g. o_proj's) take it only where the config says ``quantize_x`` or
# ``quantize_once``; an entry with ``quantize_once`` also takes rows still to be normed (``NormedRows``), and a
# down entry with it turns on gate_up's SiLU-and-mul epilogue (``fp8_gate_up_silu``).
# H200, 2026-12-03 (fifteenth session), M = 1, PDL on, us (RESULTS.md); "table": the Triton kernels' entry above.
# ``benchmarks/bench_fp8_gemv.py --models ...`` times every config against the table and prints this block.
FP8_GEMV_CONFIGS: dict[tuple[int, int], GemvConfig | None] = {
    # Llama-3.1-8B
    (6144, 4096): GemvConfig(4, 4),  # qkv: 9.9 (8 x 2 10.9; PDL off 9.5), table 10.0. Sixteenth session 4 x 1
    # 9.8 against 10.8 in isolation, but W3-fp8 333.1 against 333.9 (4 runs each): kept
    (4096, 4096): GemvConfig(8, 4),  # o_proj: 6.8, table 8.7 (quantizing x in the kernel: 9.4)
    (28672, 4096): GemvConfig(4, 2),  # gate_up: 4 x 1 31.3, table 32.2. Nineteenth session, with the RMSNorm
    # releasing it before its wait (so it launches during attention): 4 x 2 -0.7% a W3-fp8 step against 4 x 1
    (4096, 14336): GemvConfig(8, 2, staged=1, quantize_once=True),  # down: 8 x 1 18.7, table 25.9. Seventeenth
    # session, two steps of weight loaded before the PDL wait (GemvConfig.preload): W3-fp8 at 8 x 2 361.8 / 363.4,
    # 8 x 1 360.9, 4 x 4 356.3. Twenty-third session, a third step staged in shared memory there (staged=1): a
    # W3-fp8 step 2.43 -> 2.38 ms; two or three staged steps 2.57-2.59, the same for gate_up, qkv or 8 x 1 / 4 x 2:
    # slower. Twenty-fourth, its rows quantized once (so gate_up does SiLU-and-mul, no kernel between them): W3-fp8
    # 411.0-416.9 tok/s (warm runs) against 397.6-412.6 without
    # Llama-3.2-1B
    (3072, 2048): None,  # qkv: table 4.2, 4 x 4 4.3
    (2048, 2048): None,  # o_proj: table 3.4, quantizing x in the kernel 3.3
    (16384, 2048): GemvConfig(2, 2),  # gate_up: 11.4, table 16.2
    (2048, 8192): GemvConfig(8, 2),  # down: 8.2, table 10.8
    # Qwen3-0.6B
    (4096, 1024): None,  # qkv: table 2.7, 4 x 1 3.7
    (1024, 2048): GemvConfig(8, 2, quantize_x=True),  # o_proj: 2.8 quantizing x in the kernel, table 3.1
    (6144, 1024): None,  # gate_up: table 4.4, 4 x 4 4.5
    (1024, 3072): GemvConfig(8, 1),  # down: 4.0, table 4.6
}
FP8_GEMV_DEFAULT: GemvConfig | None = None  # unmeasured shapes: the Triton kernels won about half of those measured
GEMV_ENABLED = True


def pick_gemv_config(x: torch.Tensor, weight: torch.Tensor, prequantized: bool) -> GemvConfig | None:
    """The Gluon GEMV's config for ``x @ weight^T`` (``prequantized``: x's e4m3 rows come with it), or None where it
    does not serve the call."""
    if not GEMV_ENABLED or not gemv_supported(x, weight):
        return None
    config = _gemv_table_entry(weight)
    return config if config is not None and (prequantized or config.quantize_x or config.quantize_once) else None


def _gemv_table_entry(weight: torch.Tensor) -> GemvConfig | None:
    key = (weight.shape[0], weight.shape[1])
    return FP8_GEMV_CONFIGS[key] if key in FP8_GEMV_CONFIGS else FP8_GEMV_DEFAULT


SILU_EPILOGUE_ENABLED = True  # the gate_up GEMV with silu_and_mul in its epilogue, where down quantizes its rows


def fp8_gate_up_silu(x: Fp8Activations | NormedRows, weight: torch.Tensor, weight_scale: torch.Tensor,
                     down_weight: torch.Tensor) -> torch.Tensor | None:  # fmt: skip
    """``silu_and_mul`` of a W8A8 gate_up projection (``weight`` ``[gate | up]``, x quantized upstream, or rows still
    to be normed where its config quantizes once: ``NormedRows``) in the Gluon GEMV's epilogue: ``[M, d]``
    unquantized, or None where that does not pay or serve. It pays only where the down projection
    (``down_weight``) quantizes those rows itself, once per program (``GemvConfig.quantize_once``): otherwise the
    one-program ``silu_and_mul_fp8`` kernel's quantization would be a launch of its own anyway."""
    if not SILU_EPILOGUE_ENABLED or not silu_mul_supported(weight):
        return None
    down = _gemv_table_entry(down_weight)
    if down is None or not down.quantize_once or down_weight.shape[1] != weight.shape[0] // 2:
        return None
    if isinstance(x, NormedRows):
        config = _norm_prologue_config(x, weight)
        if config is None:
            return None
        return gluon_fp8_gemv_silu_mul(x.x, None, weight, weight_scale, x.x.dtype, config, norm=x.norm)
    config = pick_gemv_config(x.xq, weight, prequantized=True)
    if config is None:
        return None
    return gluon_fp8_gemv_silu_mul(x.xq, x.scale, weight, weight_scale, x.x.dtype, config)


ROPE_CACHE_ENABLED = True  # the qkv GEMV with the attention prep in its epilogue, where it serves the shape
NORM_PROLOGUE_ENABLED = True  # GEMVs norming their rows themselves (NormedRows), where their config quantizes once


def fp8_qkv_rope_cache(x: Fp8Activations | NormedRows, weight: torch.Tensor, weight_scale: torch.Tensor,
                       positions: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor, q_rows: int, kv_rows: int,
                       head_dim: int) -> torch.Tensor | None:  # fmt: skip
    """A W8A8 qkv projection (``weight`` ``[q | k | v]``, x quantized upstream, or rows still to be normed, which
    its config then norms and quantizes once: ``NormedRows``) fused with ``attention_prep``
    (``kernels/attention_prep.py``: rotary on q and k, k and v into the paged cache) in the Gluon GEMV's epilogue:
    one launch instead of two in a decode step (three with the norm). Returns q ``[M, q_rows]`` ready for
    attention, or None where the fused kernel does not serve the call (then run the norm, the projection and the
    prep kernel)."""
    if not ROPE_CACHE_ENABLED or weight.shape[0] != q_rows + 2 * kv_rows:
        return None
    if not rope_cache_supported(head_dim, cos_sin_cache.shape[-1], q_rows, kv_rows, x.x.dtype, k_cache.dtype):
        return None
    if isinstance(x, NormedRows):
        config = _norm_prologue_config(x, weight)
        if config is None:
            return None
        return gluon_fp8_gemv_rope_cache(x.x, None, weight, weight_scale, positions, cos_sin_cache, k_cache, v_cache,
                                         slot_mapping, q_rows, kv_rows, head_dim, x.x.dtype, config, norm=x.norm)
    config = pick_gemv_config(x.xq, weight, prequantized=True)
    if config is None:
        return None
    return gluon_fp8_gemv_rope_cache(x.xq, x.scale, weight, weight_scale, positions, cos_sin_cache, k_cache, v_cache,
                                     slot_mapping, q_rows, kv_rows, head_dim, x.x.dtype, config)  # fmt: skip


def norm_prologue_configured(weight: torch.Tensor) -> bool:
    """Whether decode GEMMs of this weight may take ``NormedRows`` at all (their table entry quantizes once): cheap,
    so a decoder layer builds them (and the residual's new buffer) only then."""
    config = _gemv_table_entry(weight)
    return NORM_PROLOGUE_ENABLED and HAS_GLUON and weight.is_cuda and config is not None and config.quantize_once


def _norm_prologue_config(x: NormedRows, weight: torch.Tensor) -> GemvConfig | None:
    """The GEMV config that norms and quantizes ``x`` itself for ``weight``, or None where none does."""
    config = pick_gemv_config(x.x, weight, prequantized=False)
    if NORM_PROLOGUE_ENABLED and config is not None and config.quantize_once and _norms_rows(x, config):
        return config
    return None


def _norms_rows(x: NormedRows, config: GemvConfig) -> bool:
    """Whether the GEMV's RMSNorm prologue serves ``x``: contiguous rows over more than one loop step (a single
    step quantizes in registers, without the prologue), a residual and its output of x's shape."""
    rows, norm = x.x, x.norm
    if rows.shape[1] <= config.step or rows.stride(-1) != 1 or norm.weight.shape != (rows.shape[1],):
        return False
    return norm.residual is None or all(t is not None and t.shape == rows.shape and t.is_contiguous()
                                        for t in (norm.residual, norm.residual_out))  # fmt: skip


def fp8_decode_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    input_scale: torch.Tensor | None = None,
                    quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """The decode (M <= 16) GEMM, by the shape's measured config: W8A8 on the fp8 tensor cores for an ``mma`` /
    ``mmq`` config (activations quantized per token, or with the checkpoint's static ``input_scale``: ``fp8_linear_ref``'s
    numerics), else w8a16 (``input_scale`` unused): the fma kernel for an ``fma`` config (M <= 4), else tl.dot.
    ``quantized``: x's per-token ``(xq, scale)`` made upstream (``Fp8Activations``), used by a W8A8 config in place
    of its own quantization (dynamic activations only: ignored with a static ``input_scale``)."""
    if input_scale is not None:
        quantized = None  # static scales: the upstream per-token quantization does not apply
    gemv = pick_gemv_config(x, weight, prequantized=quantized is not None)
    if gemv is not None:
        if quantized is None:  # quantized per token inside the kernel (or with the static scale, first)
            if input_scale is None:
                return gluon_fp8_gemv(x, weight, weight_scale, config=gemv)
            quantized = quantize_activations_triton(x, input_scale)
        return gluon_fp8_gemv(quantized[0], weight, weight_scale, x_scale=quantized[1], out_dtype=x.dtype,
                              config=gemv)  # fmt: skip
    config = pick_fp8_config(x.shape[0], weight.shape[0], x.shape[1])
    if config is not None and config.kind in MMA_KINDS:
        if quantized is not None and input_scale is None:
            xq, x_scale = quantized
            return fp8_mma_gemm_quantized(xq, x_scale, weight, weight_scale, config, x.dtype)
        return fp8_mma_gemm(x, weight, weight_scale, config, input_scale)
    if config is not None:
        return fp8_fma_gemm(x, weight, weight_scale, config)
    return fp8_skinny_gemm(x, weight, weight_scale)


# ------------------------------------------------------------- W8A8 tensor-core kernel (M <= 16, fp8 x fp8 MMA)
@triton.jit
def _fp8_mma_kernel(x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, out_ptr, partial_ptr, counter_ptr, M, N, K, k_per_split,
                    split_k, stride_xm, stride_wn, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, QUANT_X: tl.constexpr, STATIC: tl.constexpr, FP8_MAX: tl.constexpr,
                    MIN_SCALE: tl.constexpr, SPLIT: tl.constexpr, PF_COLS: tl.constexpr = 1,
                    USE_PDL: tl.constexpr = False):  # fmt: skip
    """Program (n, split): ``(xq @ w^T)[.., split's K] * x_scale[m] * w_scale[n]``, the splits added up into ``out``
    by the column block's last program (``store_split_partial``); both
    operands e4m3 reinterpreted from their bits and fed to ``tl.dot`` as they are (fp8 MMA, fp32 accumulation): no
    per-weight conversion. Computed as ``w @ xq^T`` so the weight tile is the MMA's M side (``BLOCK_N`` >= 64 rows:
    one Hopper wgmma, ``QGMMA.64x16x32`` on sm_90) and the 16 padded token rows its N side, both K-major as fp8
    wgmma requires; with ``x @ w^T`` (M = 16) Triton falls back to mma.sync and widens both tiles to fp16 first
    (``benchmarks/fp8_gemm_sass.py``).

    ``QUANT_X`` (the ``mmq`` kind): ``x_ptr`` is the unquantized activations and the kernel quantizes them itself,
    saving the quantization launch: a first pass over the whole row gives each token's scale (``x_scale_ptr``: the
    static per-tensor scale when ``STATIC``), then each x tile is divided, clamped and cast like
    ``_quantize_rows_kernel`` does (the same ops, so the same bits). Otherwise ``x_ptr`` holds e4m3 bits and
    ``x_scale_ptr`` their per-row scales."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    x_rows = tl.minimum(offs_m, M - 1)  # padding rows re-read row M-1 (in L1) and are never stored
    w_rows = tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn  # unmasked loads; tail columns are never stored
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + w_rows[:, None] + offs_k[None, :]
    if USE_PDL:
        prefetch_two_tiles(w_ptr, w_rows, k_start, k_end, BLOCK_K, PF_COLS)
    wait_then_release(USE_PDL)
    if QUANT_X:
        if STATIC:
            x_scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(x_scale_ptr).to(tl.float32)
        else:
            x_scale = row_scales(x_ptrs, K, offs_k, FP8_MAX, MIN_SCALE)
    else:
        x_scale = tl.load(x_scale_ptr + x_rows)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            x_in = tl.load(x_ptrs + k0)
            w_bits = tl.load(w_ptrs + k0)
        else:
            k_mask = k0 + offs_k < k_end
            x_in = tl.load(x_ptrs + k0, mask=k_mask[None, :], other=0)
            w_bits = tl.load(w_ptrs + k0, mask=k_mask[None, :], other=0)
        if QUANT_X:
            x = to_e4m3(x_in.to(tl.float32), x_scale[:, None], FP8_MAX)
        else:
            x = x_in.to(tl.float8e4nv, bitcast=True)
        w = w_bits.to(tl.float8e4nv, bitcast=True)
        acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.float32)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = tl.trans(acc * w_scale[:, None] * x_scale[None, :])
    store_split_partial(y, out_ptr, partial_ptr, counter_ptr, pid_n, pid_k, split_k, M, N, stride_om,
                        SPLIT)


# W8A8 tensor-core configs: activations quantized by a separate launch (mma), in the kernel (mmq); msk: the stream-K
# kernel (kernels/fp8_stream_k.py), activations quantized in the kernel unless the caller has them (Fp8Activations)
MMA_KINDS = ("mma", "mmq", "msk")


def fp8_mma_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, config: SkinnyConfig,
                 input_scale: torch.Tensor | None = None, *, split_k: int | None = None) -> torch.Tensor:  # fmt: skip
    """W8A8 decode GEMM: ``x [M <= 16, K]`` quantized per token (or with the static ``input_scale``) to e4m3, then
    ``xq @ weight^T`` on the fp8 tensor cores, scaled per token and per channel; x's dtype out. Same numerics as
    :func:`fp8_linear_ref` (and the prefill ``_scaled_mm`` path). ``mma``: quantization by
    :func:`quantize_activations_triton` first; ``mmq``: inside the GEMM kernel; ``msk``: the stream-K kernel,
    quantizing inside it (a static ``input_scale``: by the launch first). ``split_k`` (not ``msk``) defaults to
    ``kernels/split_k.py: tensor_core_split_k`` (the config's, else the rule). ``x``: rows with unit column stride."""
    if config.kind not in MMA_KINDS:
        raise ValueError(f"fp8_mma_gemm takes an mma, mmq or msk config, got {config}")
    m, k = x.shape
    n = weight.shape[0]
    if m > SKINNY_MAX_M:
        raise ValueError(f"fp8_mma_gemm takes at most {SKINNY_MAX_M} rows, got {m}.")
    if weight.shape[1] != k:
        raise ValueError(f"fp8 weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    if config.kind == "mmq":
        scale = input_scale if input_scale is not None else weight_scale  # unread unless static
        return _launch_mma(x, scale, weight, weight_scale, config, x.dtype, split_k, quant_x=True,
                           static=input_scale is not None)  # fmt: skip
    if config.kind == "msk" and input_scale is None:  # dynamic scales: quantized inside the stream-K kernel
        return _stream_k(x, None, weight, weight_scale, config, x.dtype)
    xq, x_scale = quantize_activations_triton(x, input_scale)
    return fp8_mma_gemm_quantized(xq, x_scale, weight, weight_scale, config, x.dtype, split_k=split_k)


def fp8_mma_gemm_quantized(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           config: SkinnyConfig, out_dtype: torch.dtype, *, split_k: int | None = None
                           ) -> torch.Tensor:  # fmt: skip
    """The GEMM half of an ``mma`` / ``msk`` config's :func:`fp8_mma_gemm`: ``xq`` e4m3 ``[M <= 16, K]`` (unit
    column stride), ``x_scale`` fp32 ``[M, 1]``."""
    if config.kind == "msk":
        return _stream_k(xq, x_scale, weight, weight_scale, config, out_dtype)
    return _launch_mma(xq.view(torch.uint8), x_scale, weight, weight_scale, config, out_dtype, split_k, quant_x=False,
                       static=False)  # fmt: skip


def _stream_k(x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, weight_scale: torch.Tensor,
              config: SkinnyConfig, out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    return fp8_stream_k_gemm(x, x_scale, weight, weight_scale, out_dtype, block_n=config.block_n,
                             block_k=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages,
                             programs_per_sm=config.per_sm or 1)  # fmt: skip


def _launch_mma(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                config: SkinnyConfig, out_dtype: torch.dtype, split_k: int | None, *, quant_x: bool, static: bool
                ) -> torch.Tensor:  # fmt: skip
    m, k = x.shape
    n = weight.shape[0]
    bits = weight.view(torch.uint8)
    if bits.stride(1) != 1:
        bits = bits.contiguous()
    if split_k is None:
        split_k = tensor_core_split_k(n, k, config, x.device.index if x.is_cuda else None)
    k_blocks = triton.cdiv(k, config.block_k)
    k_per_split = triton.cdiv(k_blocks, max(1, split_k)) * config.block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    partials, counters = split_workspace(out, split_k, triton.cdiv(n, config.block_n))
    _fp8_mma_kernel[(triton.cdiv(n, config.block_n), split_k)](
        x, x_scale, bits, weight_scale, out, partials, counters, m, n, k, k_per_split, split_k, x.stride(0),
        bits.stride(0), n, BLOCK_M=16, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        EVEN_K=k % config.block_k == 0 and k_per_split % config.block_k == 0, QUANT_X=quant_x, STATIC=static,
        FP8_MAX=FP8_MAX, MIN_SCALE=FP8_MIN_SCALE, SPLIT=split_k > 1, PF_COLS=max(1, config.block_k // 128),
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(use_pdl(x)),
    )  # fmt: skip
    return out


SKINNY_MAX_M = 16


def fp8_supported(device: torch.device) -> bool:
    """fp8 tensor cores: compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """``x @ dequant(weight)^T + bias`` on a GPU with fp8 tensor cores (the caller checks :func:`fp8_supported`):
    the decode kernels for M <= 16 (:func:`fp8_decode_gemm`), else per-token quantization and ``torch._scaled_mm``.
    ``weight``: fp8 ``[N, K]`` (row-major, so ``weight.t()`` is the column-major operand cuBLASLt wants);
    ``weight_scale``: fp32 ``[N]``. ``quantized``: 2-D x's ``(xq, scale)`` from upstream (``Fp8Activations``),
    which replaces the per-token quantization where the activations are dynamic (no ``input_scale``)."""
    if quantized is not None and (input_scale is not None or x.dim() != 2):
        quantized = None
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*shape[:-1], weight.shape[0])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if m <= SKINNY_MAX_M:
        out = fp8_decode_gemm(x2, weight, weight_scale, input_scale, quantized)
    else:
        xq, x_scale = quantized if quantized is not None else quantize_activations_triton(x2, input_scale)
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.reshape(1, -1),
                               out_dtype=torch.bfloat16)
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])
