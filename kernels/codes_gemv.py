"""Decode GEMV (a few rows of x) for weights stored as byte codes: 4-bit codebook weights (bitsandbytes NF4 / FP4,
NVFP4, GGUF IQ4; two codes a byte, high nibble first, ``kernels/bnb4_gemm.py``) and 8-bit weights (bitsandbytes
8-bit rows, GPTQ / compressed-tensors 8-bit with group scales and zero points, ``kernels/int8_gemm.py``).

Why its own kernel: at one to a few rows those formats' tile kernels (``tl.dot`` on 16 x 32 tiles, one small K step
at a time) are latency-bound: on an H100 a Llama-8B gate_up took 797 us in NF4 against a 15 us weight read. Here,
as in the fp8 / int4 CUDA-core decode kernels (``kernels/skinny_gemm.py``), each program streams ``BLOCK_N`` rows
in 16-byte loads, the next tile in flight while the current one is multiplied on the CUDA cores in fp32, and the
sums are reduced once at the end:

- 4-bit: each byte's two codes are looked up in the 16-entry codebook, which the program holds in registers
  (:func:`look_up`: a warp shuffle a code; a load of ``codebook + code`` took a layout of its own, which Triton 3.6
  converted each step's tile to and back through shared memory; a 256-entry table of code pairs ran 14-17% slower on
  the H200), and scaled by their block's absmax (a step's blocks loaded once a row, not at the tile's shape, for the
  same reason); bf16 rows are read as int32 pairs
  (``x[2j]`` in the low half, ``x[2j + 1]`` in the high), which widen to fp32 with a shift and a mask, so x costs one
  16-byte load per 8 bytes of weight;
- 8-bit: codes widened to fp32, times the group's scale (minus its zero point) per K step, or the row's scale after
  the reduction. ``int8_linear`` takes it for one row of x (1.4-1.6x ``int8_gemm``'s tile kernel a Llama-8B layer
  on the H200).

Exact up to fp32 summation order: no weight is rounded to x's dtype (the tile kernels round each dequantized weight
to it before the dot). :func:`codes_gemv` takes the formats' own tensors; the references are the formats' own.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.pdl import launch_options, use_pdl, wait_then_release
from kernels.skinny_gemm import _store_rows, _x_row_ptrs

# Rows of x up to which bnb4_linear takes this kernel (4 rows a program row; more re-read W from L2). H100, a
# Llama-8B layer (qkv + o + gate_up + down, default configs, benchmarks/bench_weight_only_gemm.py, 2026-12-05): NF4
# at 8 rows 347 us against dequantizing for cuBLAS's 411 (kernels/codes_dequant.py), NVFP4 363 against 566; at 12
# rows the dequantize path wins NF4 (412 against 512) and NVFP4 is near (566 against 533), at 16 both (676, 698).
GEMV_MAX_M = 8


class CodesGemvConfig(NamedTuple):
    """``block_n`` weight rows a program, ``block_b`` bytes of each row a K step, ``num_warps``, and ``ahead``: how
    many steps' bytes are in flight while one is multiplied (1 or 2)."""

    block_n: int
    block_b: int
    num_warps: int
    ahead: int = 1


@triton.jit
def _load_x_pairs(x32_row_ptr, b0, offs_b, row_zeros):
    """x's elements ``2 (b0 + j)`` and ``2 (b0 + j) + 1`` as fp32, at the ``[BLOCK_N, BLOCK_B]`` byte tile's shape
    (each thread re-reads its slice for each of its rows from L1, so x takes the tile's register layout): one int32
    holds a bf16 pair, the lower address in its low half."""
    pair = tl.load(x32_row_ptr + b0 + row_zeros[:, None] + offs_b[None, :])
    first = (pair << 16).to(tl.float32, bitcast=True)
    second = (pair & -65536).to(tl.float32, bitcast=True)
    return first, second


@triton.jit
def load_codebook(codebook_ptr, FOUR_BIT: tl.constexpr = True):
    """The 16 codebook values, held by the program for :func:`look_up` (zeros, unread, for 8-bit codes)."""
    if FOUR_BIT:
        values = tl.load(codebook_ptr + tl.arange(0, 16)).to(tl.float32)
    else:
        values = tl.zeros([16], dtype=tl.float32)
    return values


@triton.jit
def look_up(codebook, codes):
    """``codebook[codes]`` at the codes' 2-D shape, the 16 values held by the program: ``tl.gather``, a warp shuffle
    (or a shared-memory read) a code. A load of ``codebook_ptr + codes`` instead is a gather the compiler lays out
    for itself: Triton 3.6 (the GPU's) converted each GEMV step's tile to that layout and back through shared memory
    (1,360 instructions a step against 829 for NF4 at 8 x 256 bytes, and NVFP4 spilled), and the MoE kernel's
    pipeliner made it one 4-byte cp.async a code (7-12x the 16-bit experts' time on the H100)."""
    flat = tl.reshape(codes, [codes.shape[0] * codes.shape[1]])
    return tl.reshape(tl.gather(codebook, flat, 0), [codes.shape[0], codes.shape[1]])


@triton.jit
def step_scales(row_ptrs, k0, live, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """The block scale of each element of a ``[rows, BLOCK_K]`` step from K offset ``k0`` (``row_ptrs``: each row's
    first scale; ``live``: the rows to read, or None where every pointer is a real row's): one per row when the step
    lies in one block, else the step's blocks loaded once a row and repeated over their elements. (Loaded at the
    tile's shape instead, the scales take a layout of their own, and Triton 3.6 converted each step's tile to it and
    back through shared memory.) The GEMV steps in bytes (``BLOCKSIZE`` bytes a block), the MoE kernel in codes."""
    if BLOCK_K <= BLOCKSIZE:  # constexpr: one branch compiles, one return (Triton needs one return type)
        ptrs = row_ptrs + k0 // BLOCKSIZE
        if live is None:
            scales = tl.load(ptrs).to(tl.float32)[:, None]
        else:
            scales = tl.load(ptrs, mask=live, other=0.0).to(tl.float32)[:, None]
    else:
        BLOCKS: tl.constexpr = BLOCK_K // BLOCKSIZE
        ptrs = row_ptrs[:, None] + k0 // BLOCKSIZE + tl.arange(0, BLOCKS)[None, :]
        if live is None:
            per_block = tl.load(ptrs).to(tl.float32)
        else:
            per_block = tl.load(ptrs, mask=live[:, None], other=0.0).to(tl.float32)  # [rows, BLOCKS]
        rows: tl.constexpr = per_block.shape[0]
        scales = tl.reshape(tl.broadcast_to(per_block[:, :, None], (rows, BLOCKS, BLOCKSIZE)), (rows, BLOCK_K))
    return scales


@triton.jit
def _load_x_halves(x_row_ptr, b0, offs_b, row_zeros):
    """The same two elements from a 16-bit or fp32 row (two strided loads), as fp32."""
    ptrs = x_row_ptr + 2 * (b0 + row_zeros[:, None] + offs_b[None, :])
    return tl.load(ptrs).to(tl.float32), tl.load(ptrs + 1).to(tl.float32)


@triton.jit
def _four_bit_step(acc, w_first, w_second, x_row_ptr, b0, offs_b, row_zeros, X_PAIRS: tl.constexpr):
    """``acc`` plus each byte's two weights times their x elements."""
    if X_PAIRS:
        x_first, x_second = _load_x_pairs(x_row_ptr, b0, offs_b, row_zeros)
    else:
        x_first, x_second = _load_x_halves(x_row_ptr, b0, offs_b, row_zeros)
    return acc + w_first * x_first + w_second * x_second


@triton.jit
def _eight_bit_step(acc, w, x_row_ptr, b0, offs_b, row_zeros):
    return acc + w * tl.load(x_row_ptr + b0 + row_zeros[:, None] + offs_b[None, :]).to(tl.float32)


@triton.jit
def _step(acc0, acc1, acc2, acc3, codes, b0, offs_b, row_zeros, s_rows, z_rows, codebook, x0_ptr, x1_ptr, x2_ptr,
          x3_ptr, FOUR_BIT: tl.constexpr, GROUP: tl.constexpr, ZEROS: tl.constexpr, X_PAIRS: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
    """One K step from byte ``b0`` of each row: the step's codes widened and scaled, times each x row's elements."""
    if FOUR_BIT:
        scale = step_scales(s_rows, b0, None, BLOCK_B, GROUP // 2)  # GROUP // 2 bytes an absmax
        byte = codes.to(tl.int32)
        w_first = look_up(codebook, byte >> 4) * scale
        w_second = look_up(codebook, byte & 15) * scale
        acc0 = _four_bit_step(acc0, w_first, w_second, x0_ptr, b0, offs_b, row_zeros, X_PAIRS)
        if BLOCK_M > 1:
            acc1 = _four_bit_step(acc1, w_first, w_second, x1_ptr, b0, offs_b, row_zeros, X_PAIRS)
        if BLOCK_M > 2:
            acc2 = _four_bit_step(acc2, w_first, w_second, x2_ptr, b0, offs_b, row_zeros, X_PAIRS)
            acc3 = _four_bit_step(acc3, w_first, w_second, x3_ptr, b0, offs_b, row_zeros, X_PAIRS)
    else:
        w = codes.to(tl.float32)
        if GROUP > 0:
            scale = tl.load(s_rows + b0 // GROUP).to(tl.float32)[:, None]
            if ZEROS:
                w = (w - tl.load(z_rows + b0 // GROUP).to(tl.float32)[:, None]) * scale
            else:
                w = w * scale
        acc0 = _eight_bit_step(acc0, w, x0_ptr, b0, offs_b, row_zeros)
        if BLOCK_M > 1:
            acc1 = _eight_bit_step(acc1, w, x1_ptr, b0, offs_b, row_zeros)
        if BLOCK_M > 2:
            acc2 = _eight_bit_step(acc2, w, x2_ptr, b0, offs_b, row_zeros)
            acc3 = _eight_bit_step(acc3, w, x3_ptr, b0, offs_b, row_zeros)
    return acc0, acc1, acc2, acc3


@triton.jit
def _codes_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, codebook_ptr, row_scale_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    FOUR_BIT: tl.constexpr,
    GROUP: tl.constexpr,
    ZEROS: tl.constexpr,
    ROW_SCALES: tl.constexpr,
    X_PAIRS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    AHEAD: tl.constexpr = 1,
    USE_PDL: tl.constexpr = False,
):  # fmt: skip
    """Program (n, m): ``out[m*BLOCK_M : +BLOCK_M, n*BLOCK_N : +BLOCK_N]``. ``FOUR_BIT``: codebook codes, ``GROUP``
    weights an absmax (``s [N, K / GROUP]``, fp32 or fp8); else 8-bit codes with ``GROUP`` weights a scale (and
    zero point: ``ZEROS``) ``[N, K / GROUP]``, or (``GROUP`` 0) one scale per row applied to the sum. ``ROW_SCALES``:
    the sum times ``row_scale[n]`` (NVFP4's global scale). ``X_PAIRS``: x is bf16 (4-byte aligned), read as int32 pairs
    (4-bit only). ``AHEAD``: steps loaded before the one multiplied (1, 2). K's bytes a row are whole ``BLOCK_B`` steps;
    an 8-bit step lies in one group."""
    wait_then_release(USE_PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    safe_rows = tl.minimum(rows, N - 1).to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B)
    row_zeros = tl.zeros([BLOCK_N], dtype=tl.int32)
    w_ptrs = w_ptr + safe_rows[:, None] * stride_wn + offs_b[None, :]
    s_rows = s_ptr + safe_rows * stride_sn
    z_rows = z_ptr + safe_rows * stride_sn
    num_tiles = (K // 2 if FOUR_BIT else K) // BLOCK_B
    m0 = tl.program_id(1) * BLOCK_M
    x0_ptr, x1_ptr, x2_ptr, x3_ptr = _x_row_ptrs(x_ptr, m0, M, stride_xm)
    if X_PAIRS:  # the same rows as int32 pairs (the row stride is even: K is)
        x0_ptr, x1_ptr, x2_ptr, x3_ptr = (x0_ptr.to(tl.pointer_type(tl.int32), bitcast=True),
                                          x1_ptr.to(tl.pointer_type(tl.int32), bitcast=True),
                                          x2_ptr.to(tl.pointer_type(tl.int32), bitcast=True),
                                          x3_ptr.to(tl.pointer_type(tl.int32), bitcast=True))  # fmt: skip
    codebook = load_codebook(codebook_ptr, FOUR_BIT)
    acc0 = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    codes = tl.load(w_ptrs, eviction_policy="evict_first")
    if AHEAD > 1:  # constexpr: each loop carries only its own tiles (a carried tile of bytes costs a PRMT a byte)
        codes_after = tl.load(w_ptrs + tl.minimum(1, num_tiles - 1) * BLOCK_B, eviction_policy="evict_first")
        for t in range(num_tiles):
            codes_next = tl.load(w_ptrs + tl.minimum(t + 2, num_tiles - 1) * BLOCK_B, eviction_policy="evict_first")
            acc0, acc1, acc2, acc3 = _step(acc0, acc1, acc2, acc3, codes, t * BLOCK_B, offs_b, row_zeros, s_rows,
                                           z_rows, codebook, x0_ptr, x1_ptr, x2_ptr, x3_ptr, FOUR_BIT, GROUP,
                                           ZEROS, X_PAIRS, BLOCK_M, BLOCK_B)  # fmt: skip
            codes, codes_after = codes_after, codes_next
    else:
        for t in range(num_tiles):
            codes_next = tl.load(w_ptrs + tl.minimum(t + 1, num_tiles - 1) * BLOCK_B, eviction_policy="evict_first")
            acc0, acc1, acc2, acc3 = _step(acc0, acc1, acc2, acc3, codes, t * BLOCK_B, offs_b, row_zeros, s_rows,
                                           z_rows, codebook, x0_ptr, x1_ptr, x2_ptr, x3_ptr, FOUR_BIT, GROUP,
                                           ZEROS, X_PAIRS, BLOCK_M, BLOCK_B)  # fmt: skip
            codes = codes_next

    if ROW_SCALES or (not FOUR_BIT and GROUP == 0):  # one factor per output column: after the sums
        factor = tl.load(row_scale_ptr + safe_rows).to(tl.float32)[:, None]
        acc0 *= factor
        acc1 *= factor
        acc2 *= factor
        acc3 *= factor
    _store_rows(out_ptr, m0, M, stride_om, acc0, acc1, acc2, acc3, 0.0, rows, N, False, BLOCK_M)


def default_config(row_bytes: int, four_bit: bool, group: int, rows: int = 1) -> CodesGemvConfig:
    """4-bit: 4 rows a program in steps of 256 bytes (or the longest dividing the row) on one warp. H100, Llama-8B
    layers (qkv + o + gate_up + down; ``benchmarks/bench_weight_only_gemm.py``, 2026-12-05, thirty-first session)
    with the codebook held in registers, us: NF4 98.5 at one row (8 rows a program 114.8; the codebook loaded 169.4),
    191 at four (8 x 128 bytes 221); NVFP4 99.7 (123.9; 237.7) and 196 (230). 8-bit: 8 rows, steps of 256 bytes at
    one row of x (on two warps where the group allows only 128 or less), 128 at more, one warp: on the H200, weights
    scaled by row 114 us a layer, GPTQ 8-bit in groups of 128 154 (175 on one warp)."""
    steps = (256, 128, 64, 32, 16) if four_bit or rows == 1 else (128, 64, 32, 16)
    block_b = next(b for b in steps if step_fits(b, row_bytes, four_bit, group))
    if four_bit:
        return CodesGemvConfig(4, block_b, 1)
    return CodesGemvConfig(8, block_b, 2 if rows == 1 and block_b <= 128 else 1)


def step_fits(block_b: int, row_bytes: int, four_bit: bool, group: int) -> bool:
    """Whether K steps of ``block_b`` bytes fit the weight: whole steps a row, and (8-bit) each step within one
    group."""
    return row_bytes % block_b == 0 and (four_bit or not group or group % block_b == 0)


def gemv_fits(k: int, four_bit: bool, group: int) -> bool:
    """Whether :func:`codes_gemv` takes this weight: its smallest steps (16 bytes) fit."""
    return step_fits(16, k // 2 if four_bit else k, four_bit, group)


def codes_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, four_bit: bool, group: int,
               codebook: torch.Tensor | None = None,
               zeros: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
               config: CodesGemvConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``x [..., K] @ W^T`` in x's dtype. ``four_bit``: ``weight [N, K / 2]`` uint8 codes into ``codebook`` with
    ``scale [N, K / group]`` absmaxes (and NVFP4's ``row_scale [N]``); else ``weight [N, K]`` 8-bit codes with
    ``scale [N, K / group]`` (and ``zeros``), or ``group`` 0: ``scale [N]`` per row."""
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    row_bytes = k // 2 if four_bit else k
    config = config or default_config(row_bytes, four_bit, group, m)
    block_b = config.block_b
    if not step_fits(block_b, row_bytes, four_bit, group):
        raise ValueError(f"codes_gemv: {block_b}-byte steps do not fit rows of {row_bytes} bytes, group {group}")
    block_m = min(4, triton.next_power_of_2(m))
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, block_m))
    per_row = scale if not four_bit and not group else row_scale
    _codes_gemv_kernel[grid](
        x2, weight, scale, zeros if zeros is not None else scale,
        codebook if codebook is not None else scale,
        per_row if per_row is not None else scale, out, m, n, k, x2.stride(0), weight.stride(0),
        scale.stride(0) if scale.dim() == 2 else 0, out.stride(0),
        FOUR_BIT=four_bit, GROUP=group, ZEROS=zeros is not None, ROW_SCALES=row_scale is not None,
        X_PAIRS=four_bit and x.dtype == torch.bfloat16 and x2.data_ptr() % 4 == 0,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n, BLOCK_B=block_b, AHEAD=config.ahead,
        num_warps=config.num_warps, num_stages=1, **launch_options(use_pdl(x)),
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)
