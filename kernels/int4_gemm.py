"""int4 weight GEMM (w4a16): ``out[M, N] = x[M, K] @ W[K, N]`` with ``W`` dequantized in registers.

Weight layout (``pack_int4_kernel``): ``qweight`` int32 ``[N, K / 8]``, each output column's codes contiguous along K
(so the decode kernel streams a column with 16-byte loads), interleaved within each 32-row block of K: nibble ``i``
of word ``4c + r`` holds input row ``32c + 4i + r``. Then the x values a thread needs for nibble ``i`` of its four
consecutive words are four consecutive elements (one 8-byte load), not four scattered ones. ``scales`` and ``zeros``
``[K / group, N]`` (zeros as numbers, in the activation dtype); ``W[k, n] = (q[k, n] - zeros[k // group, n]) *
scales[k // group, n]``. A ``perm`` (GPTQ act-order) gathers x's columns first: the rows were sorted by group at load.
``core/layers/quantization/int4.py`` repacks AWQ and GPTQ checkpoints into this layout; K must be a multiple of 32.
Where the Gluon GEMV serves a layer's decode rows (all but qkv projections) the layer keeps it tiled
(:func:`tile_int4`: each 16 columns' weight one contiguous run, same shapes); every kernel here takes ``tiled``.

Five paths:

- the Gluon GEMV (``kernels/int4_gemv_gluon.py``; M <= 8 on CUDA, whole-number zero points, groups of a multiple
  of 128): the weight straight into mma.sync fragments, dequantized in registers (``INT4_GEMV_CONFIGS``). On the
  H200 it halves a Llama-8B layer's decode GEMMs (48 us against 93 us at M = 1); the paths below take the rest.
- ``fma`` (M <= 4, CUDA cores), the int4 twin of ``kernels/skinny_gemm.py``'s: each program owns ``block_n``
  columns and walks K in ``block_k`` tiles spanning any number of groups, the next tile's words (and its group
  scales/zeros) loaded while the current one is used; a nibble becomes a float without an int->float convert (its
  bits or'ed into 1.0's mantissa: ``f = 1 + q / 16``), is dequantized with one FMA (``f * 16s - (16 + z)s``) and
  multiplied into one fp32 accumulator per x row at word granularity, reduced once at the end. Configs per shape in
  ``INT4_SKINNY_CONFIGS`` / ``INT4_DEFAULT_CONFIGS`` (``benchmarks/bench_quant_gemm.py --sweep`` measures them).
- ``dot`` (tl.dot, any M; the decode launch pads x to 16 rows, the prefill one uses ``[64, block_n]`` tiles):
  each program dequantizes a ``[block_k, block_n]`` tile of one group in registers, its x tile (loaded contiguous)
  reordered to the interleave in registers (``tl.permute``); at decode output blocks are narrow enough to give every SM work (``kernels/split_k.py``), and
  only small layers split K (fp32 partial sums, added up by one ``sum``).
- ``mma`` (M <= 16, tensor cores; the H200 sweep's choice for every Llama-3.1-8B shape at M = 1, and the default):
  ``_int4_mma_kernel`` computes ``W^T @ x^T`` so the weight tile is the 64/128-row side of Hopper's wgmma (the fp8
  ``_fp8_mma_kernel``'s trick), dequantizing it in registers with Marlin's magic-number conversion: nibbles or'ed
  into the mantissa of fp16 1024.0 / bf16 128.0 two at a time (``lop3``), then ``- (magic + zero)`` and ``* scale``
  as packed half2 ops (inline PTX; plain bit ops under the interpreter), fp32 accumulation in place across K.
  ``mms``: the same kernel feeding ``q - z`` (exact) to the MMA and scaling each tile's fp32 product per column
  (tiles within one group; ~11% fewer loop instructions). ``benchmarks/int4_gemm_sass.py`` counts their loops
  against the fma kernel's offline. Zero points that are not whole numbers (GGUF Q4_1) take the ``mma`` kind with
  ``FRACTIONAL_ZEROS``.
- dequantize + cuBLAS (more than 16 rows, CUDA): ``_int4_dequant_kernel`` writes the dense weight into a scratch
  buffer shared by all layers, then ``F.linear`` (``INT4_DEQUANT_MIN_M``).

``int4_linear_ref`` (unpack, dequantize, fp32 matmul) is the reference and the CPU path.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.dense_scratch import dense_weight_scratch
from kernels.gemv_rows_gluon import rope_cache_supported
from kernels.int4_gemv_gluon import (Int4GemvConfig, gemv_device, gluon_int4_gemv, gluon_int4_gemv_rope_cache,
                                     int4_gemv_supported)
from kernels.pdl import launch_options, use_pdl, wait_then_release
from kernels.skinny_gemm import SkinnyConfig, _c, _store_rows, _x_row_ptrs, m_bucket
from kernels.split_k import decode_launch, split_workspace, store_split_partial, tensor_core_split_k

# AutoAWQ's GEMM packing: nibble i of an int32 holds column AWQ_ORDER[i] of its eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = tuple(4 * i for i in range(8))


def _nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """The eight 4-bit fields of each int32 as a new dim ``dim`` (nibble 0 first), int32 in 0..15."""
    shape = [1] * (packed.dim() + 1)
    shape[dim] = 8
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device).reshape(shape)
    return (packed.unsqueeze(dim) >> shifts) & 0xF


def unpack_int4_columns(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """``[R, C / 8]`` int32 packed along columns -> ``[R, C]``; ``order[i]``: the column nibble ``i`` holds (default
    sequential)."""
    nib = _nibbles(packed, 2)  # [R, C/8, 8]
    if order is not None:
        inverse = [order.index(j) for j in range(8)]
        nib = nib[..., inverse]
    return nib.reshape(packed.shape[0], -1)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """``[R / 8, C]`` int32 packed along rows (sequential nibbles) -> ``[R, C]``."""
    return _nibbles(packed, 1).reshape(-1, packed.shape[1])


def _to_int32_bits(value: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit patterns held in int64 -> the int32 with the same bits."""
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` values 0..15 -> ``[R / 8, C]`` int32, sequential nibbles along rows (the kernel's layout)."""
    rows, cols = q.shape
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=q.device).reshape(1, 8, 1)
    return _to_int32_bits((q.to(torch.int64).reshape(rows // 8, 8, cols) << shifts).sum(1))


def pack_int4_columns(q: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """``[R, C]`` values 0..15 -> ``[R, C / 8]`` int32; nibble ``i`` holds column ``order[i]`` of each eight."""
    rows, cols = q.shape
    grouped = q.to(torch.int64).reshape(rows, cols // 8, 8)
    if order is not None:
        grouped = grouped[..., list(order)]
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=q.device)
    return _to_int32_bits((grouped << shifts).sum(-1))


KERNEL_K_BLOCK = 32  # the kernel layout interleaves codes within blocks of 32 input rows


def pack_int4_kernel(q: torch.Tensor) -> torch.Tensor:
    """``[K, N]`` codes 0..15 -> the kernel layout ``[N, K / 8]`` int32 (nibble ``i`` of word ``4c + r`` holds row
    ``32c + 4i + r`` of the column). K must be a multiple of 32."""
    k, n = q.shape
    if k % KERNEL_K_BLOCK:
        raise ValueError(f"the int4 kernel layout needs K to be a multiple of {KERNEL_K_BLOCK}, got {k}")
    blocks = q.to(torch.int64).t().reshape(n, k // 32, 8, 4)  # [n, c, i, r]: row 32c + 4i + r
    words = blocks.transpose(2, 3).reshape(n, k // 8, 8)  # [n, word 4c + r, nibble i]
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=q.device)
    return _to_int32_bits((words << shifts).sum(-1))


def unpack_int4_kernel(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_kernel`: ``[N, K / 8]`` int32 -> ``[K, N]`` codes (int32)."""
    n, words = qweight.shape
    nib = _nibbles(qweight, 2)  # [n, word, i]
    return nib.reshape(n, words // 4, 4, 8).transpose(2, 3).reshape(n, words * 8).t()


TILE_ROWS = 16  # the tiled layout: 16 output columns (one Gluon GEMV program) ...
TILE_K = 128  # ... times 128 input rows (64 bytes each) are one contiguous kilobyte


def tiling_supported(n: int, k: int, group_size: int) -> bool:
    """Whether a weight can take the tiled layout (:func:`tile_int4`): whole tiles, groups of whole chunks."""
    return n % TILE_ROWS == 0 and k % TILE_K == 0 and group_size % TILE_K == 0


def tile_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The kernel layout's tensors in the tiled storage order, same shapes and dtypes (every size check reads the
    same numbers; the kernels take ``tiled=True``): codes ``[N / 16, K / 128, 16, 16 words]`` (each 16 columns'
    weight one contiguous run, a chunk's 16 x 64 bytes after the other), scales and zeros ``[N / 16, K / group,
    16]``. A Gluon GEMV program then streams one contiguous run (gate_up 26.6 -> 23.1 us on the H200)."""
    n, words = qweight.shape
    groups = scales.shape[0]
    if not tiling_supported(n, words * 8, words * 8 // groups):
        raise ValueError(f"the tiled int4 layout needs N % {TILE_ROWS} == 0 and K, group % {TILE_K} == 0, got "
                         f"{tuple(qweight.shape)} with {groups} groups")
    codes = qweight.reshape(n // TILE_ROWS, TILE_ROWS, words // 16, 16).transpose(1, 2).reshape(n, words)

    def per_tile(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(groups, n // TILE_ROWS, TILE_ROWS).transpose(0, 1).reshape(groups, n)

    return codes, per_tile(scales), per_tile(zeros)


def untile_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Inverse of :func:`tile_int4`."""
    n, words = qweight.shape
    groups = scales.shape[0]
    codes = qweight.reshape(n // TILE_ROWS, words // 16, TILE_ROWS, 16).transpose(1, 2).reshape(n, words)

    def per_group(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n // TILE_ROWS, groups, TILE_ROWS).transpose(0, 1).reshape(groups, n)

    return codes, per_group(scales), per_group(zeros)


@triton.jit
def _row_offsets(rows, stride, UNIT_K: tl.constexpr, TILED: tl.constexpr):
    """Where each weight row (output column) starts, in the loaded unit (``UNIT_K`` input rows: 8 for int32, 4 for
    int16 views); ``stride``: units per row. Tiled: the row's tile, then its 128 k within each chunk."""
    if TILED:
        return (rows // 16).to(tl.int64) * (16 * stride) + (rows % 16) * (128 // UNIT_K)
    return rows.to(tl.int64) * stride


@triton.jit
def _tile_offset(t, BLOCK_K: tl.constexpr, UNIT_K: tl.constexpr, TILED: tl.constexpr):
    """Where K tile ``t`` (``BLOCK_K`` input rows, a power of two) starts from its row's start
    (:func:`_row_offsets`), in units of ``UNIT_K`` input rows; tiled, chunks of 128 k are 16 rows apart. Written so
    the compiler sees its alignment (a multiple of ``min(BLOCK_K, 128) / UNIT_K``)."""
    if not TILED:
        return t * (BLOCK_K // UNIT_K)
    PER: tl.constexpr = 128 // UNIT_K  # units per 128 k of one row
    if BLOCK_K >= 128:
        return t * (BLOCK_K // 128 * 16 * PER)
    return (t // (128 // BLOCK_K)) * (16 * PER) + (t % (128 // BLOCK_K)) * (BLOCK_K // UNIT_K)


@triton.jit
def _in_tile_offsets(offs, UNIT_K: tl.constexpr, TILED: tl.constexpr):
    """Units ``offs`` (an arange) of a K tile from its start (:func:`_tile_offset`): tiled, runs of 128 k
    contiguous (the compiler sees it: 16-byte loads), the next run 16 rows on."""
    if not TILED:
        return offs
    PER: tl.constexpr = 128 // UNIT_K
    return offs + (offs // PER) * (15 * PER)


@triton.jit
def _scale_offsets(group, rows, N, K, GROUP_SIZE: tl.constexpr, TILED: tl.constexpr):
    """Scale / zero point of ``group`` and weight row ``rows``: ``[K / group, N]`` or tiled ``[N / 16, K / group,
    16]`` (:func:`tile_int4`)."""
    if TILED:
        return (rows // 16) * (16 * (K // GROUP_SIZE)) + group * 16 + rows % 16
    return group * N + rows


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    tiled: bool = False) -> torch.Tensor:  # fmt: skip
    """The fp32 ``[K, N]`` weight of the kernel layout (rows in the permuted order, if any; ``tiled``: in
    :func:`tile_int4`'s order)."""
    if tiled:
        qweight, scales, zeros = untile_int4(qweight, scales, zeros)
    q = unpack_int4_kernel(qweight).float()
    groups = torch.arange(q.shape[0], device=q.device) // group_size
    return (q - zeros.float()[groups]) * scales.float()[groups]


def dequantize_int4_offsets(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int
                            ) -> torch.Tensor:  # fmt: skip
    """The fp32 ``[K, N]`` weight ``q * s + o`` of the kernel layout with offsets in place of zero points (GGUF
    experts: ``kernels/fused_moe.py``)."""
    q = unpack_int4_kernel(qweight).float()
    groups = torch.arange(q.shape[0], device=q.device) // group_size
    return q * scales.float()[groups] + offsets.float()[groups]


def gather_columns(x2: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """``x2``'s columns in the weight's row order (``perm``: act-order, rows sorted by group at load). A ``perm``
    longer than x's width also names column ``K``, a zero column appended here: the padding rows of a weight
    regrouped into equal groups (``core/layers/quantization/int4.py: regroup_rows``)."""
    if perm is None:
        return x2.contiguous()
    if perm.numel() != x2.shape[1]:
        x2 = torch.nn.functional.pad(x2, (0, 1))
    return x2[:, perm.long()]


def int4_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, perm: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    tiled: bool = False) -> torch.Tensor:  # fmt: skip
    """Reference: dequantize the whole weight, fp32 matmul, x's dtype out."""
    k = x.shape[-1]
    x2 = gather_columns(x.reshape(-1, k).float(), perm)
    out = x2 @ dequantize_int4(qweight, scales, zeros, group_size, tiled)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


@triton.jit
def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, k_per_split, stride_xm, stride_qn, stride_om,
                      stride_os, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr = False,
                      TILED: tl.constexpr = False):  # fmt: skip
    """The tl.dot kernel: program (n, m, split) dequantizes ``[BLOCK_K, BLOCK_N]`` tiles of one group each
    (``TILED``: :func:`tile_int4`'s order)."""
    wait_then_release(USE_PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_packed = tl.arange(0, BLOCK_K // 8)
    m_mask = offs_m < M
    n_mask = offs_n < N
    shifts = tl.arange(0, 8) * 4
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    q_rows = _row_offsets(offs_n, stride_qn, 8, TILED)
    in_tile = _in_tile_offsets(offs_packed, 8, TILED)
    for k0 in range(k_start, k_end, BLOCK_K):
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
        # Tile row 8p + i below is nibble i of word p = 4c + r, i.e. input row 32c + 4i + r (the interleave): x's
        # columns reordered to match, [.., c, i, r] -> [.., c, r, i] (in registers / shared memory, not by a gather).
        x = tl.reshape(tl.permute(tl.reshape(x, (BLOCK_M, BLOCK_K // 32, 8, 4)), (0, 1, 3, 2)), (BLOCK_M, BLOCK_K))
        # Each int32 is loaded once and split into its 8 rows: [BLOCK_K / 8, 8, BLOCK_N] -> [BLOCK_K, BLOCK_N].
        at = _tile_offset(k0 // BLOCK_K, BLOCK_K, 8, TILED) + in_tile
        qw = tl.load(qw_ptr + q_rows[None, :] + at[:, None], mask=n_mask[None, :], other=0)
        q = tl.reshape((qw[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N)).to(tl.float32)
        sz = _scale_offsets(k0 // GROUP_SIZE, offs_n, N, K, GROUP_SIZE, TILED)
        s = tl.load(s_ptr + sz, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz, mask=n_mask, other=0.0).to(tl.float32)
        w = (q * s[None, :] - (z * s)[None, :]).to(x.dtype)  # (q - z) * s as one FMA per element
        if IEEE:  # fp32 activations (CPU-path dtypes, tests): no TF32 rounding on the GPU
            acc += tl.dot(x, w, out_dtype=tl.float32, input_precision="ieee")
        else:
            acc += tl.dot(x, w, out_dtype=tl.float32)
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _block_k(k: int, group_size: int, largest: int) -> int | None:
    """The largest block_k <= ``largest`` (32..128, a power of two) dividing both K and the group size."""
    block = largest
    while block >= KERNEL_K_BLOCK:
        if k % block == 0 and group_size % block == 0:
            return block
        block //= 2
    return None


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              *, block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
              num_warps: int = 4, tiled: bool = False) -> torch.Tensor:  # fmt: skip
    """The tl.dot kernel on a 2-D ``x [M, K]`` (contiguous rows): the decode shape for M <= 16, else prefill.
    Block sizes and ``split_k`` default to a per-shape choice; tests pass their own. ``tiled``: the weight in
    :func:`tile_int4`'s order."""
    m, k = x.shape
    n = qweight.shape[0]
    decode = m <= 16
    block_m = 16 if decode else 64
    block_k = block_k or _block_k(k, group_size, 128 if decode else 64)
    if block_k is None or k % block_k or group_size % block_k or block_k % KERNEL_K_BLOCK:
        raise ValueError(f"int4_gemm: no block_k (a multiple of {KERNEL_K_BLOCK}) divides K={k} and the group size "
                         f"{group_size}.")
    k_blocks = k // block_k
    if decode and (block_n is None or split_k is None):
        auto_n, auto_split = decode_launch(n, k_blocks, x.device.index if x.is_cuda else None)
        block_n, split_k = block_n or auto_n, split_k or auto_split
    block_n = block_n or 128
    split_k = split_k or 1
    n_blocks, m_blocks = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    if split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        stride_os = 0
    else:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
        stride_os = out.stride(0)
    _int4_gemm_kernel[(n_blocks, m_blocks, split_k)](
        x, qweight, scales, zeros, out, m, n, k, k_per_split, x.stride(0), qweight.stride(0), n, stride_os,
        GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32, num_warps=num_warps, **launch_options(use_pdl(x)), TILED=tiled,
    )
    return out if split_k == 1 else out.sum(0).to(x.dtype)


# ------------------------------------------------------------------------------- fma kernel (M <= 4, CUDA cores)

# Exact shapes: (m_bucket, N, K) -> config at group 128: an ``fma`` one (CUDA cores, M <= 4) or an ``mma`` / ``mms``
# one (tensor cores, M <= 16: ``_int4_mma_kernel``); None sends the shape to the tl.dot kernel.
# Paste the block printed by ``benchmarks/bench_quant_gemm.py --sweep`` (on the H200) here; other shapes use
# INT4_DEFAULT_CONFIGS. block_k counts input rows (block_k / 8 words per column per tile).
INT4_SKINNY_CONFIGS: dict[tuple[int, int, int], SkinnyConfig | None] = {  # H200, 2026-12-03 (tenth), Llama-3.1-8B
    (1, 6144, 4096): _c("mms:128x128:w8:s3"),  # qkv_proj: fma 27.4 us, mma 12.5 us, mms 11.7 us, tl.dot 45.1 us
    (1, 4096, 4096): _c("mms:128x128:w8:s3"),  # o_proj: fma 17.8 us, mma 10.0 us, mms 9.4 us, tl.dot 34.9 us
    (1, 28672, 4096): _c("mma:128x256:w4:s3:k1"),  # gate_up: fma 114.8 us, mma 50.9 us, mms 52.0 us, tl.dot 91.8 us
    (1, 4096, 14336): _c("mms:128x128:w8:s3:k8"),  # down_proj: fma 58.2 us, mma 23.1 us, mms 21.6 us, tl.dot 115.2 us
}
# Shapes without an entry: the best geo-mean over the Llama-3.1-8B layer shapes at M = 1 (22.9 us; the best fma
# config's 43 us). The tensor-core kernel always computes 16 x rows (BLOCK_M = 16, the MMA's N side), so its time at
# M = 1 is its time at every M up to 16: the buckets above 1 reuse M = 1's tensor-core entries and default
# (``pick_int4_config``), while an fma config's time grows with M.
INT4_DEFAULT_CONFIGS: dict[int, SkinnyConfig | None] = {
    1: _c("mma:128x256:w4:s3"),
}
INT4_FMA_MAX_M = 4
INT4_MMA_MAX_M = 16  # the mma kernel pads x to 16 rows (the MMA's N side)
# The tensor-core kernel's kinds: ``mma`` scales each weight before the MMA (tiles may span groups), ``mms`` scales
# each tile's fp32 product per column after it (tiles within a group).
INT4_MMA_KINDS = ("mma", "mms")


def pick_int4_config(m: int, n: int, k: int, group_size: int) -> SkinnyConfig | None:
    """The decode configuration for this shape: ``fma`` (M <= 4) or ``mma`` / ``mms`` (M <= 16), or None for the
    tl.dot kernel. A bucket without its own entry (or default) takes M = 1's when that is a tensor-core config, whose
    time does not depend on M up to 16."""
    bucket = m_bucket(m)
    if bucket > INT4_MMA_MAX_M:
        return None
    if _has_entry(bucket, n, k, group_size) or bucket in INT4_DEFAULT_CONFIGS:
        config = _table_config(bucket, n, k, group_size)
    else:  # M = 1's, if a tensor-core config (an fma config's time grows with M)
        config = _table_config(1, n, k, group_size)
        if config is not None and config.kind not in INT4_MMA_KINDS:
            config = None
    if config is None or (config.kind == "fma" and m > INT4_FMA_MAX_M):
        return None
    return _fit_block_k(config, k, group_size)


def _has_entry(bucket: int, n: int, k: int, group_size: int) -> bool:
    return group_size == 128 and (bucket, n, k) in INT4_SKINNY_CONFIGS


def _table_config(bucket: int, n: int, k: int, group_size: int) -> SkinnyConfig | None:
    """The bucket's entry for this shape (entries are measured at group 128), else the bucket's default."""
    if _has_entry(bucket, n, k, group_size):
        return INT4_SKINNY_CONFIGS[(bucket, n, k)]
    return INT4_DEFAULT_CONFIGS.get(bucket)


def _fit_block_k(config: SkinnyConfig, k: int, group_size: int) -> SkinnyConfig | None:
    """``config`` with block_k halved until it divides K and nests with the group size (one divides the other), or
    None if no multiple of 32 does."""
    block_k = config.block_k
    while block_k >= KERNEL_K_BLOCK and not _block_k_fits(config.kind, block_k, k, group_size):
        block_k //= 2
    if block_k < KERNEL_K_BLOCK:
        return None
    return config if block_k == config.block_k else dataclasses.replace(config, block_k=block_k)


def _block_k_fits(kind: str, block_k: int, k: int, group_size: int) -> bool:
    """block_k divides K and nests with the group size (``mms``: divides it, so a tile has one scale per column)."""
    if k % block_k or block_k % KERNEL_K_BLOCK:
        return False
    return group_size % block_k == 0 or (kind != "mms" and block_k % group_size == 0)


@triton.jit
def _nibble_as_float(words, i: tl.constexpr):
    """Nibble ``i`` of each int32 as ``1 + q / 16`` (its bits moved to 19..22 and or'ed into 1.0: no I2F)."""
    if 4 * i <= 19:
        bits = (words << (19 - 4 * i)) & 0x00780000
    else:
        bits = (words >> (4 * i - 19)) & 0x00780000
    return (bits | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _int4_fma_tile(acc0, acc1, acc2, acc3, words, s, z, x0_ptr, x1_ptr, x2_ptr, x3_ptr, x_offs,
                   BLOCK_M: tl.constexpr):  # fmt: skip
    """acc_r[n, j] += sum_i W[k(j, i), n] * x_r[k(j, i)] over one tile: W = (f - 1 - z / 16) * 16 s = f * 16 s
    - (16 + z) s, one FMA per weight, then one FMA per weight and x row."""
    sf = s.to(tl.float32)
    s16 = sf * 16.0
    shift = -(16.0 + z.to(tl.float32)) * sf
    for i in tl.static_range(8):
        w = _nibble_as_float(words, i) * s16 + shift
        acc0 += w * tl.load(x0_ptr + x_offs + 4 * i).to(tl.float32)
        if BLOCK_M > 1:
            acc1 += w * tl.load(x1_ptr + x_offs + 4 * i).to(tl.float32)
        if BLOCK_M > 2:
            acc2 += w * tl.load(x2_ptr + x_offs + 4 * i).to(tl.float32)
            acc3 += w * tl.load(x3_ptr + x_offs + 4 * i).to(tl.float32)
    return acc0, acc1, acc2, acc3


@triton.jit
def _int4_fma_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_om,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    TILED: tl.constexpr = False,
):  # fmt: skip
    """Program (n, m) computes out[m*BLOCK_M : +BLOCK_M, n*BLOCK_N : +BLOCK_N]: ``[BLOCK_N, BLOCK_K / 8]`` word
    tiles (16-byte loads along K, columns past N re-read the last one), the next tile and its group scales/zeros
    loaded before the current one is used. BLOCK_K divides K and nests with GROUP_SIZE (one divides the other).
    ``TILED``: :func:`tile_int4`'s order."""
    wait_then_release(USE_PDL)
    WORDS: tl.constexpr = BLOCK_K // 8
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    safe_rows = tl.minimum(rows, N - 1)
    offs_j = tl.arange(0, WORDS)
    q_ptrs = (qw_ptr + _row_offsets(safe_rows, stride_qn, 8, TILED)[:, None]
              + _in_tile_offsets(offs_j, 8, TILED)[None, :])
    # Word j of a tile starts at input row 32 (j // 4) + j % 4 of it; nibble i adds 4 i.
    word_k = 32 * (offs_j // 4) + offs_j % 4
    # a tile's groups, from its first one (the offsets are linear in the group: N or 16 apart)
    sz_offs = _scale_offsets((word_k // GROUP_SIZE)[None, :], safe_rows[:, None], N, K, GROUP_SIZE, TILED)
    group_stride = 16 if TILED else N
    x_offs = tl.zeros([BLOCK_N], dtype=tl.int32)[:, None] + word_k[None, :]
    num_tiles = K // BLOCK_K

    words = tl.load(q_ptrs, eviction_policy="evict_first")
    s = tl.load(s_ptr + sz_offs)
    z = tl.load(z_ptr + sz_offs)
    m0 = tl.program_id(1) * BLOCK_M
    x0_ptr, x1_ptr, x2_ptr, x3_ptr = _x_row_ptrs(x_ptr, m0, M, stride_xm)
    acc0 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    for t in range(1, num_tiles):
        group_row = (t * BLOCK_K) // GROUP_SIZE * group_stride
        words_next = tl.load(q_ptrs + _tile_offset(t, BLOCK_K, 8, TILED), eviction_policy="evict_first")
        s_next = tl.load(s_ptr + group_row + sz_offs)
        z_next = tl.load(z_ptr + group_row + sz_offs)
        acc0, acc1, acc2, acc3 = _int4_fma_tile(acc0, acc1, acc2, acc3, words, s, z, x0_ptr, x1_ptr, x2_ptr, x3_ptr,
                                                (t - 1) * BLOCK_K + x_offs, BLOCK_M)
        words, s, z = words_next, s_next, z_next
    acc0, acc1, acc2, acc3 = _int4_fma_tile(acc0, acc1, acc2, acc3, words, s, z, x0_ptr, x1_ptr, x2_ptr, x3_ptr,
                                            (num_tiles - 1) * BLOCK_K + x_offs, BLOCK_M)

    _store_rows(out_ptr, m0, M, stride_om, acc0, acc1, acc2, acc3, 0.0, rows, N, False, BLOCK_M)


def int4_fma_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int, config: SkinnyConfig, tiled: bool = False) -> torch.Tensor:  # fmt: skip
    """The CUDA-core kernel on a 2-D ``x [M, K]`` (rows with unit column stride; any M, 4 rows per program, meant
    for M <= 4) with an ``fma`` config whose block_k divides K and nests with the group size (``tiled``: the weight
    in :func:`tile_int4`'s order)."""
    m, k = x.shape
    n = qweight.shape[0]
    block_k = config.block_k
    if config.kind != "fma" or block_k % KERNEL_K_BLOCK or k % block_k or (group_size % block_k
                                                                            and block_k % group_size):
        raise ValueError(f"int4_fma_gemm: config {config} does not fit K={k}, group {group_size} (an fma config "
                         f"whose block_k, a multiple of {KERNEL_K_BLOCK}, divides K and nests with the group size)")
    if qweight.shape[1] * 8 != k:
        raise ValueError(f"int4 qweight {tuple(qweight.shape)} does not match x {tuple(x.shape)}")
    if tiled and block_k % TILE_K and TILE_K % block_k:
        raise ValueError(f"int4_fma_gemm: the tiled layout needs a block_k that nests with {TILE_K}, got {config}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    block_m = min(4, m_bucket(m))
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, block_m))
    _int4_fma_kernel[grid](
        x, qweight, scales, zeros, out, m, n, k, x.stride(0), qweight.stride(0), out.stride(0),
        GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=block_k,
        num_warps=config.num_warps, num_stages=1, **launch_options(use_pdl(x)), TILED=tiled,
    )  # fmt: skip
    return out


# ------------------------------------------------------- many rows: dequantize once, then the dense GEMM (cuBLAS)

# Past the tensor-core decode kernel's 16 rows, the weight is dequantized into a scratch buffer and multiplied by
# cuBLAS. H200, Llama-8B shapes (2026-12-02, `benchmarks/bench_quant_gemm.py --m 16 32 64 128 256 1024`, group
# 128), us per layer (qkv + o + gate_up + down), the tl.dot kernel against dequantize + cuBLAS (bf16 cuBLAS): M = 32
# 442 / 304 (120), M = 64 446 / 310 (127), M = 256 715 / 360 (178), M = 1024 2,300 / 740 (571). The tl.dot kernel's
# [64, 128] tiles leave most SMs idle on the narrow layers (down_proj: 32 programs, 229 us against 83), and it
# dequantizes each tile again per 64 rows. Only gate_up is faster on tl.dot below 128 rows (94 against 162 us).
# vLLM's AWQ makes the same switch.
INT4_DEQUANT_MIN_M = INT4_MMA_MAX_M + 1


@triton.jit
def _int4_dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_qn, GROUP_SIZE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILED: tl.constexpr = False):  # fmt: skip
    """Program (n, k): the ``[BLOCK_N, BLOCK_K]`` block of ``W^T`` (``out [N, K]``, x's dtype, row-major: the
    layout ``F.linear`` hands cuBLAS) from the kernel layout (``TILED``: :func:`tile_int4`'s order); a block lies
    within one group."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k0 = pid_k * BLOCK_K
    at = _tile_offset(pid_k, BLOCK_K, 8, TILED) + _in_tile_offsets(tl.arange(0, BLOCK_K // 8), 8, TILED)
    words = tl.load(qw_ptr + _row_offsets(offs_n, stride_qn, 8, TILED)[:, None] + at[None, :],
                    mask=n_mask[:, None], other=0)  # [BLOCK_N, BLOCK_K / 8]
    q = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF  # [.., word 4c + r, nibble i]
    # nibble i of word 4c + r is input row 32c + 4i + r: [n, c, r, i] -> [n, c, i, r] puts the rows in order
    q = tl.reshape(tl.permute(tl.reshape(q, (BLOCK_N, BLOCK_K // 32, 4, 8)), (0, 1, 3, 2)), (BLOCK_N, BLOCK_K))
    sz = _scale_offsets(k0 // GROUP_SIZE, offs_n, N, K, GROUP_SIZE, TILED)
    s = tl.load(s_ptr + sz, mask=n_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sz, mask=n_mask, other=0.0).to(tl.float32)
    w = (q.to(tl.float32) - z[:, None]) * s[:, None]
    out_ptrs = out_ptr + offs_n[:, None].to(tl.int64) * K + (k0 + tl.arange(0, BLOCK_K))[None, :]
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


def dequantize_int4_into_scratch(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                                 dtype: torch.dtype, tiled: bool = False) -> torch.Tensor:  # fmt: skip
    """``W^T`` ``[N, K]`` in ``dtype``, in the device's dense-weight scratch buffer (``kernels/dense_scratch.py``)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    out = dense_weight_scratch(qweight.device, dtype, n, k)
    block_k = _block_k(k, group_size, 128)
    block_n = 32
    _int4_dequant_kernel[(triton.cdiv(n, block_n), k // block_k)](
        qweight, scales, zeros, out, n, k, qweight.stride(0), GROUP_SIZE=group_size, BLOCK_N=block_n,
        BLOCK_K=block_k, TILED=tiled, num_warps=4)  # fmt: skip
    return out


def int4_dequant_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, tiled: bool = False) -> torch.Tensor:  # fmt: skip
    """``x @ W`` for many rows: the weight dequantized once (:func:`dequantize_int4_into_scratch`), then the dense
    GEMM."""
    return F.linear(x, dequantize_int4_into_scratch(qweight, scales, zeros, group_size, x.dtype, tiled))


# The Gluon decode GEMM (kernels/int4_gemv_gluon.py: M <= 8, whole-number zero points, groups of a multiple of 128)
# on GPUs where it runs: configs per (N, K), else INT4_GEMV_DEFAULT; None (or INT4_GEMV_ENABLED off) sends the shape
# to the Triton kernels' tables above. ``benchmarks/bench_int4_gemv.py`` times every config against them.
# H200, 2026-12-04 (twenty-second session), M = 1, PDL on, us (RESULTS.md); "table": the Triton kernels above; all
# but qkv on the tiled layout (``tile_int4``), as the engine stores them.
INT4_GEMV_CONFIGS: dict[tuple[int, int], Int4GemvConfig | None] = {  # Llama-3.1-8B, group 128
    (6144, 4096): Int4GemvConfig(8, 1, 1),  # qkv (plain): 6.8 (8 x 2 x 2: 8.3), table 11.0
    (4096, 4096): Int4GemvConfig(4, 2, 2),  # o_proj: 5.0 (8 x 2 x 2: 5.2; plain 5.3), table 8.0
    (28672, 4096): Int4GemvConfig(4, 1, 1),  # gate_up: 23.1-23.7 (plain 25.9-26.8), table 54.8
    (4096, 14336): Int4GemvConfig(8, 2, 2),  # down: 13.3 (plain 14.5-14.9), table 19.1
}
# Unmeasured shapes: 8 x 2 x 2, faster than the Triton table on all four Llama-8B shapes (the best on down).
INT4_GEMV_DEFAULT: Int4GemvConfig | None = Int4GemvConfig(8, 2, 2)
INT4_GEMV_ENABLED = True


def pick_int4_gemv_config(x: torch.Tensor, qweight: torch.Tensor, group_size: int, integer_zeros: bool
                          ) -> Int4GemvConfig | None:  # fmt: skip
    """The Gluon int4 GEMV's config for ``x @ W``, or None where it does not serve the call (zero points that are
    not whole numbers keep the Triton kernel's ``FRACTIONAL_ZEROS`` path)."""
    if not (INT4_GEMV_ENABLED and integer_zeros and int4_gemv_supported(x, qweight, group_size)):
        return None
    key = (qweight.shape[0], x.shape[1])
    return INT4_GEMV_CONFIGS[key] if key in INT4_GEMV_CONFIGS else INT4_GEMV_DEFAULT


# Layers whose decode rows the Gluon GEMV serves keep their weight in the tiled layout (``tile_int4``); every other
# int4 path reads it too (the Triton kernels as fast as on the plain layout). H200, 2026-12-04 (twenty-second
# session), M = 1, us: gate_up 26.6 -> 23.1-23.7, down 14.5 -> 13.3, o_proj 5.2 -> 5.0; W3-AWQ 436 -> 461 tok/s
# (RESULTS.md). A qkv layer keeps the plain layout: its GEMV pairs rotary rows in its epilogue
# (``int4_qkv_rope_cache``), which the tiles' fixed 16 rows do not.
INT4_TILED_ENABLED = True


def tiled_layout_pays(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> bool:
    """Whether a layer's kernel-layout weight should take the tiled layout: on a GPU where the Gluon GEMV runs, in
    a dtype it takes, a shape that tiles."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    return (INT4_TILED_ENABLED and INT4_GEMV_ENABLED and scales.dtype in _TRITON_DTYPES
            and tiling_supported(n, k, group_size) and gemv_device(qweight.device))  # fmt: skip


INT4_ROPE_CACHE_ENABLED = True  # the qkv GEMV with the attention prep in its epilogue, where it serves the shape


def int4_qkv_rope_cache(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int, perm: torch.Tensor | None, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, q_rows: int, kv_rows: int, head_dim: int
                        ) -> torch.Tensor | None:  # fmt: skip
    """A w4a16 qkv projection (``qweight`` ``[q | k | v]`` rows, whole-number zeros) fused with ``attention_prep``
    in the Gluon GEMV's epilogue: q ``[M, q_rows]`` ready for attention, the new keys and values in the cache; None
    where the fused kernel does not serve the call (then run the projection and the prep kernel)."""
    if not INT4_ROPE_CACHE_ENABLED or qweight.shape[0] != q_rows + 2 * kv_rows:
        return None
    if not rope_cache_supported(head_dim, cos_sin_cache.shape[-1], q_rows, kv_rows, x.dtype, k_cache.dtype):
        return None
    config = pick_int4_gemv_config(x, qweight, group_size, integer_zeros=True)
    if config is None:
        return None
    x2 = gather_columns(x, perm) if perm is not None else x  # act-order: the rows were sorted by group at load
    return gluon_int4_gemv_rope_cache(x2, qweight, scales, zeros, group_size, positions, cos_sin_cache, k_cache,
                                      v_cache, slot_mapping, q_rows, kv_rows, head_dim, config)


def int4_decode_or_prefill_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                                group_size: int, integer_zeros: bool = True, tiled: bool = False
                                ) -> torch.Tensor:  # fmt: skip
    """The Gluon GEMV where it serves the call (``pick_int4_gemv_config``), else the shape's measured decode kernel
    (``pick_int4_config``: mma for M <= 16 or fma for M <= 4), the dequantized
    weight through cuBLAS from ``INT4_DEQUANT_MIN_M`` rows on (CUDA), else the tl.dot kernel.
    ``integer_zeros=False``: zero points that are not whole numbers (GGUF Q4_1's ``-m / d``) take the tensor-core
    kernel's ``mma`` kind (an ``mms`` config becomes the ``mma`` one of the same tiles), which adds the fractional
    part apart; the other kernels dequantize in fp32. ``tiled``: the weight in :func:`tile_int4`'s order (every
    kernel here reads it)."""
    if x.shape[0] >= INT4_DEQUANT_MIN_M and x.is_cuda:
        return int4_dequant_gemm(x, qweight, scales, zeros, group_size, tiled)
    gemv_config = pick_int4_gemv_config(x, qweight, group_size, integer_zeros)
    if gemv_config is not None:
        return gluon_int4_gemv(x, qweight, scales, zeros, group_size, gemv_config, tiled)
    config = pick_int4_config(x.shape[0], qweight.shape[0], x.shape[1], group_size)
    if config is not None and config.kind in INT4_MMA_KINDS:
        if not integer_zeros and config.kind != "mma":
            config = dataclasses.replace(config, kind="mma")  # tiles within a group fit the mma kind too
        return int4_mma_gemm(x, qweight, scales, zeros, group_size, config, integer_zeros=integer_zeros, tiled=tiled)
    if config is not None:
        return int4_fma_gemm(x, qweight, scales, zeros, group_size, config, tiled)
    return int4_gemm(x, qweight, scales, zeros, group_size, tiled=tiled)


_TRITON_DTYPES = (torch.float16, torch.bfloat16)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                perm: torch.Tensor | None = None, bias: torch.Tensor | None = None, *, backend: str = "auto",
                integer_zeros: bool = True, tiled: bool = False) -> torch.Tensor:  # fmt: skip
    """``x @ W (+ bias)``: the Triton kernels on CUDA (fp16/bf16), the reference otherwise. ``integer_zeros``,
    ``tiled``: see :func:`int4_decode_or_prefill_gemm`."""
    k = x.shape[-1]
    n = qweight.shape[0]
    weight_k = k if perm is None else perm.numel()
    if not (use_triton(x, backend) and x.dtype in _TRITON_DTYPES and _block_k(weight_k, group_size, 128) is not None):
        return int4_linear_ref(x, qweight, scales, zeros, group_size, perm, bias, tiled)
    x2 = gather_columns(x.reshape(-1, k), perm)
    out = (int4_decode_or_prefill_gemm(x2, qweight, scales, zeros, group_size, integer_zeros, tiled) if x2.shape[0]
           else x2.new_empty(0, n))
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------- mma kernel (M <= 16, w4a16 on the tensor cores)

# Magic-number dequantization: a nibble q or'ed into the low mantissa bits of a float whose units-in-the-last-place
# are 1 (fp16 1024.0 = 0x6400, bf16 128.0 = 0x4300, fp32 2^23 = 0x4B000000) is that float + q exactly, so
# ``(bits | q) - (magic + z)`` is ``q - z`` without an int -> float conversion.
_MAGIC_F16 = tl.constexpr(0x6400)
_MAGIC_BF16 = tl.constexpr(0x4300)
_MAGIC_F32 = tl.constexpr(0x4B000000)
_MAGIC_VALUES = {torch.float16: 1024.0, torch.bfloat16: 128.0, torch.float32: 8388608.0}


@triton.jit
def _nibble_magic(halves, j: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Interpreter / fallback: nibble ``j`` of each int16 or'ed into the magic float's mantissa (magic + q)."""
    q = (halves.to(tl.int32) >> (4 * j)) & 0xF
    if DOT_DTYPE == tl.float16:
        return (q | _MAGIC_F16).to(tl.int16).to(tl.float16, bitcast=True)
    elif DOT_DTYPE == tl.bfloat16:  # bf16 128 + q as the top half of an fp32 (the same bits, widened)
        return ((q | _MAGIC_BF16) << 16).to(tl.float32, bitcast=True)
    else:
        return (q | _MAGIC_F32).to(tl.float32, bitcast=True)


def _dequant_asm(body: str, scale_op: str) -> tl.constexpr:
    """The PTX of one dequantization step: ``body`` leaves ``q - z`` of nibbles 0..3 in a, b, c, d (half2 each);
    ``scale_op`` (``mul.f16x2 $i, r, $7`` / ``fma.rn.bf16x2 $i, r, $7, nz``, or ``mov.b32 $i, r``) writes outputs."""
    tail = "\n".join("                " + scale_op.format(out=f"${i}", reg=reg) + ";" for i, reg in enumerate("abcd"))
    return tl.constexpr("{\n" + body + tail + "\n}")


_F16_BODY = """
                .reg .b32 a, b, c, d, t, k;
                mov.b32 k, 0x2c002c00;
                lop3.b32 a, $4, 0x000f000f, 0x64006400, 0xea;
                lop3.b32 b, $4, 0x00f000f0, 0x64006400, 0xea;
                shr.u32 t, $4, 8;
                lop3.b32 c, t, 0x000f000f, 0x64006400, 0xea;
                lop3.b32 d, t, 0x00f000f0, 0x64006400, 0xea;
                sub.f16x2 a, a, $5;
                fma.rn.f16x2 b, b, k, $6;
                sub.f16x2 c, c, $5;
                fma.rn.f16x2 d, d, k, $6;
"""
_BF16_BODY = """
                .reg .b32 a, b, c, d, t, one, nz;
                mov.b32 one, 0x3f803f80;
                mov.b32 nz, 0x80008000;
                lop3.b32 a, $4, 0x000f000f, 0x43004300, 0xea;
                shr.u32 t, $4, 4;
                lop3.b32 b, t, 0x000f000f, 0x43004300, 0xea;
                shr.u32 t, $4, 8;
                lop3.b32 c, t, 0x000f000f, 0x43004300, 0xea;
                shr.u32 t, $4, 12;
                lop3.b32 d, t, 0x000f000f, 0x43004300, 0xea;
                fma.rn.bf16x2 a, a, one, $5;
                fma.rn.bf16x2 b, b, one, $5;
                fma.rn.bf16x2 c, c, one, $5;
                fma.rn.bf16x2 d, d, one, $5;
"""
_F16_SCALED_ASM = _dequant_asm(_F16_BODY, "mul.f16x2 {out}, {reg}, $7")
_BF16_SCALED_ASM = _dequant_asm(_BF16_BODY, "fma.rn.bf16x2 {out}, {reg}, $7, nz")
# Fractional zero points: ``(q - zi) * s + o`` with ``o = (zi - z) * s`` ($8), one rounding.
_F16_OFFSET_ASM = _dequant_asm(_F16_BODY, "fma.rn.f16x2 {out}, {reg}, $7, $8")
_BF16_OFFSET_ASM = _dequant_asm(_BF16_BODY, "fma.rn.bf16x2 {out}, {reg}, $7, $8")
_F16_UNSCALED_ASM = _dequant_asm(_F16_BODY, "mov.b32 {out}, {reg}")
_BF16_UNSCALED_ASM = _dequant_asm(_BF16_BODY, "mov.b32 {out}, {reg}")


@triton.jit
def _dequant_halves(halves, magic_z, hi_z, s, offset, DOT_DTYPE: tl.constexpr, USE_ASM: tl.constexpr,
                    SCALE: tl.constexpr, OFFSET: tl.constexpr):  # fmt: skip
    """``[BN, E]`` int16 (four 4-bit codes each, nibble j at bits 4j) -> four ``[BN, E]`` tiles of ``(q_j - z) * s``
    (``SCALE``; else ``q_j - z``, exact) in ``DOT_DTYPE``. ``magic_z`` is ``magic + z``, ``hi_z`` is
    ``-(magic / 16 + z)`` (fp16 only), both in DOT_DTYPE. ``OFFSET`` (with ``SCALE``): ``(q_j - z) * s + offset``,
    for a ``z`` that is the whole-number part of a zero point and ``offset`` the rest times ``-s``.

    ``USE_ASM`` (CUDA, fp16 / bf16): two int16 per 32-bit register, so each step below is one instruction per two
    weights. fp16 (Marlin's): ``lop3`` puts nibbles 0 and 1 of both halves into the mantissas of 1024.0 (nibble 1
    as 16 q: subtracted as ``fma(h, 1/16, -(64 + z))``), one shift and two more ``lop3`` give nibbles 2 and 3; then
    ``sub`` / ``fma`` for the zero point and ``mul`` for the scale, all ``.f16x2``. bf16 (7 mantissa bits: every
    nibble shifted down to bits 0..3 of 128.0): three shifts, four ``lop3``, ``fma.bf16x2`` by 1 and ``-(128 + z)``
    and by the scale (+ -0.0). The fallback does the same arithmetic one element at a time."""
    if USE_ASM and OFFSET:
        if DOT_DTYPE == tl.float16:
            w0, w1, w2, w3 = tl.inline_asm_elementwise(
                asm=_F16_OFFSET_ASM, constraints="=r,=r,=r,=r,r,r,r,r,r", args=[halves, magic_z, hi_z, s, offset],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
        else:
            w0, w1, w2, w3 = tl.inline_asm_elementwise(
                asm=_BF16_OFFSET_ASM, constraints="=r,=r,=r,=r,r,r,r,r,r", args=[halves, -magic_z, hi_z, s, offset],
                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
    elif USE_ASM:
        if DOT_DTYPE == tl.float16:
            if SCALE:
                w0, w1, w2, w3 = tl.inline_asm_elementwise(
                    asm=_F16_SCALED_ASM, constraints="=r,=r,=r,=r,r,r,r,r", args=[halves, magic_z, hi_z, s],
                    dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
            else:
                w0, w1, w2, w3 = tl.inline_asm_elementwise(
                    asm=_F16_UNSCALED_ASM, constraints="=r,=r,=r,=r,r,r,r,r", args=[halves, magic_z, hi_z, s],
                    dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
        else:
            if SCALE:
                w0, w1, w2, w3 = tl.inline_asm_elementwise(
                    asm=_BF16_SCALED_ASM, constraints="=r,=r,=r,=r,r,r,r,r", args=[halves, -magic_z, hi_z, s],
                    dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
            else:
                w0, w1, w2, w3 = tl.inline_asm_elementwise(
                    asm=_BF16_UNSCALED_ASM, constraints="=r,=r,=r,=r,r,r,r,r", args=[halves, -magic_z, hi_z, s],
                    dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
    elif DOT_DTYPE == tl.bfloat16:  # in fp32, rounded once at the end: the same bits as the PTX (q - z exact,
        mz = magic_z.to(tl.float32)  # (q - z) * s exact in fp32); the interpreter's bf16 arithmetic is wrong
        w0 = _nibble_magic(halves, 0, DOT_DTYPE) - mz
        w1 = _nibble_magic(halves, 1, DOT_DTYPE) - mz
        w2 = _nibble_magic(halves, 2, DOT_DTYPE) - mz
        w3 = _nibble_magic(halves, 3, DOT_DTYPE) - mz
        if SCALE:
            sf = s.to(tl.float32)
            w0, w1, w2, w3 = w0 * sf, w1 * sf, w2 * sf, w3 * sf
        if OFFSET:
            of = offset.to(tl.float32)
            w0, w1, w2, w3 = w0 + of, w1 + of, w2 + of, w3 + of
        w0, w1, w2, w3 = w0.to(DOT_DTYPE), w1.to(DOT_DTYPE), w2.to(DOT_DTYPE), w3.to(DOT_DTYPE)
    else:
        w0 = _nibble_magic(halves, 0, DOT_DTYPE) - magic_z
        w1 = _nibble_magic(halves, 1, DOT_DTYPE) - magic_z
        w2 = _nibble_magic(halves, 2, DOT_DTYPE) - magic_z
        w3 = _nibble_magic(halves, 3, DOT_DTYPE) - magic_z
        if SCALE:
            w0, w1, w2, w3 = w0 * s, w1 * s, w2 * s, w3 * s
        if OFFSET:
            w0, w1, w2, w3 = w0 + offset, w1 + offset, w2 + offset, w3 + offset
    return w0, w1, w2, w3


@triton.jit
def _int4_mma_kernel(x_ptr, qh_ptr, s_ptr, z_ptr, out_ptr, partial_ptr, counter_ptr, M, N, K, tiles_per_split, split_k,
                     stride_xm, stride_qn, stride_om, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAGIC: tl.constexpr, SCALE_AFTER: tl.constexpr,
                     USE_ASM: tl.constexpr, FRACTIONAL_ZEROS: tl.constexpr = False,
                     SPLIT: tl.constexpr = False, USE_PDL: tl.constexpr = False,
                     TILED: tl.constexpr = False):  # fmt: skip
    """Program (n, split): ``x[:, split's K] @ W[split's K, n block]`` (the splits added up into ``out`` by the column
    block's last program, ``store_split_partial``), computed as
    ``W^T @ x^T`` so the dequantized ``[BLOCK_N, BLOCK_K]`` weight tile is the MMA's M side (64 / 128 rows: Hopper
    wgmma) and the 16 padded token rows its N side; fp32 accumulation in place across K.

    ``qh_ptr`` is the kernel layout's qweight viewed as int16 ``[N, K / 4]``: half ``h`` of word ``p`` holds
    nibbles ``4h .. 4h + 3``, so nibble ``j`` of int16 ``e = 2p + h`` is nibble ``i = 4h + j`` of word ``p``,
    input row ``32c + 4i + r`` for ``p = 4c + r``; it is dequantized into tile column ``j * BLOCK_K / 4 + e`` and
    x's tile columns are reordered to match. A tile lies within one group (BLOCK_K <=
    GROUP_SIZE, one scale / zero per column) or spans whole groups (GROUP_SIZE < BLOCK_K: ``[BLOCK_N, groups]``
    scales broadcast over each group's ``GROUP_SIZE / 4`` int16). ``MAGIC``: the magic float's value in x's dtype.

    ``SCALE_AFTER`` (the ``mms`` kind; tiles within one group): the tile is dequantized to ``q - z`` only (exact
    small integers) and each tile's fp32 product is scaled per column before it is added up: one FMA per output
    element and tile instead of one multiply per two weights, but a fresh MMA accumulator per tile.

    ``FRACTIONAL_ZEROS`` (the ``mma`` kind; zero points that are not whole numbers, GGUF Q4_1's ``-m / d``): ``magic +
    z`` in the dot dtype would round ``z`` to a whole number ``zi``, so the weight is ``(q - zi) * s + (zi - z) * s``,
    the second term added by the same fused multiply-add that scales: no extra instruction.

    ``TILED``: the weight in :func:`tile_int4`'s order (a tile's 128-k chunks 16 rows apart)."""
    wait_then_release(USE_PDL)
    HALVES: tl.constexpr = BLOCK_K // 4
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE  # groups per tile, when a tile spans several
    DOT_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_e = tl.arange(0, HALVES)
    x_rows = tl.minimum(offs_m, M - 1)  # padding rows re-read row M-1 and are never stored
    w_rows = tl.minimum(offs_n, N - 1)  # unmasked loads; tail columns are never stored
    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :]
    q_ptrs = qh_ptr + _row_offsets(w_rows, stride_qn, 4, TILED)[:, None] + _in_tile_offsets(offs_e, 4, TILED)[None, :]
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, K // BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(t_start, t_end):  # tile t: offsets t * HALVES are known 16-byte aligned (16-byte async copies)
        k0 = t * BLOCK_K
        halves = tl.load(q_ptrs + _tile_offset(t, BLOCK_K, 4, TILED))
        if BLOCK_K <= GROUP_SIZE:
            sz = _scale_offsets(k0 // GROUP_SIZE, w_rows, N, K, GROUP_SIZE, TILED)
            s = tl.load(s_ptr + sz).to(tl.float32)[:, None]
            z = tl.load(z_ptr + sz).to(tl.float32)[:, None]
        else:
            sz = _scale_offsets((k0 // GROUP_SIZE + tl.arange(0, GROUPS))[None, :], w_rows[:, None], N, K,
                                GROUP_SIZE, TILED)  # fmt: skip
            s = tl.load(s_ptr + sz).to(tl.float32)
            z = tl.load(z_ptr + sz).to(tl.float32)
            s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, GROUPS, GROUP_SIZE // 4)), (BLOCK_N, HALVES))
            z = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, GROUPS, GROUP_SIZE // 4)), (BLOCK_N, HALVES))
        shape: tl.constexpr = (BLOCK_N, HALVES)
        magic_z = (MAGIC + z).to(DOT_DTYPE)
        if FRACTIONAL_ZEROS:
            tl.static_assert(not SCALE_AFTER)
            magic_z = (MAGIC + tl.floor(z + 0.5)).to(DOT_DTYPE)
            z_whole = magic_z.to(tl.float32) - MAGIC  # the zero point magic_z holds
            offset = ((z_whole - z) * s).to(DOT_DTYPE)
            z = z_whole
        else:
            offset = s.to(DOT_DTYPE)  # unused
        hi_z = tl.broadcast_to((-(MAGIC / 16.0) - z).to(DOT_DTYPE), shape)
        w0, w1, w2, w3 = _dequant_halves(halves, tl.broadcast_to(magic_z, shape), hi_z,
                                         tl.broadcast_to(s.to(DOT_DTYPE), shape), tl.broadcast_to(offset, shape),
                                         DOT_DTYPE, USE_ASM, not SCALE_AFTER, FRACTIONAL_ZEROS)
        # Tile column j * E + e holds nibble j of int16 e (join adds a minor dim: [BN, E, 2, 2] with [.., u, t] =
        # nibble 2u + t, moved in front of e): each 32-bit register the asm wrote is two adjacent tile columns.
        w = tl.reshape(tl.permute(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (0, 2, 3, 1)), (BLOCK_N, BLOCK_K))
        # ... which is input row 32c + 16h + 4j + r of the tile for e = 8c + 2r + h: x's columns reordered to match
        # ([.., c, h, j, r] -> [.., j, c, r, h]), in registers / shared memory, not by a gather.
        x = tl.load(x_ptrs + k0)
        x = tl.reshape(tl.permute(tl.reshape(x, (BLOCK_M, BLOCK_K // 32, 2, 4, 4)), (0, 3, 1, 4, 2)),
                       (BLOCK_M, BLOCK_K))
        if SCALE_AFTER:
            tl.static_assert(BLOCK_K <= GROUP_SIZE)
            if DOT_DTYPE == tl.float32:  # CPU-path dtype (tests): no TF32 rounding on the GPU
                acc += tl.dot(w, tl.trans(x), out_dtype=tl.float32, input_precision="ieee") * s
            else:
                acc += tl.dot(w, tl.trans(x), out_dtype=tl.float32) * s
        elif DOT_DTYPE == tl.float32:
            acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.float32, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.float32)
    store_split_partial(tl.trans(acc), out_ptr, partial_ptr, counter_ptr, pid_n, pid_k, split_k, M, N,
                        stride_om, SPLIT)


def int4_mma_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int, config: SkinnyConfig, *, split_k: int | None = None,
                  integer_zeros: bool = True, tiled: bool = False) -> torch.Tensor:  # fmt: skip
    """The tensor-core decode kernel on a 2-D ``x [M <= 16, K]`` (unit column stride; fp16 / bf16, fp32 for tests)
    with an ``mma`` / ``mms`` config whose block_k (a multiple of 32) divides K and nests with the group size
    (``mms``: divides it). ``split_k`` defaults to ``tensor_core_split_k`` (the config's, else the rule).
    ``integer_zeros=False`` (zero points that are not whole numbers) needs an ``mma`` config (``FRACTIONAL_ZEROS``)."""
    m, k = x.shape
    n = qweight.shape[0]
    block_k = config.block_k
    if config.kind not in INT4_MMA_KINDS:
        raise ValueError(f"int4_mma_gemm takes an mma or mms config, got {config}")
    if not integer_zeros and config.kind != "mma":
        raise ValueError(f"int4_mma_gemm: zero points that are not whole numbers need an mma config, got {config}")
    if m > INT4_MMA_MAX_M:
        raise ValueError(f"int4_mma_gemm takes at most {INT4_MMA_MAX_M} rows, got {m}")
    if k % KERNEL_K_BLOCK:
        raise ValueError(f"int4_mma_gemm: K={k} is not a multiple of {KERNEL_K_BLOCK} (the int4 kernel layout)")
    if not _block_k_fits(config.kind, block_k, k, group_size):
        raise ValueError(f"int4_mma_gemm: config {config} does not fit K={k}, group {group_size} (block_k, a "
                         f"multiple of {KERNEL_K_BLOCK}, must divide K and nest with the group size; mms: divide "
                         "the group size)")
    if qweight.shape[1] * 8 != k:
        raise ValueError(f"int4 qweight {tuple(qweight.shape)} does not match x {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError("int4_mma_gemm needs x with unit column stride")
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    k_blocks = k // block_k
    if split_k is None:
        split_k = tensor_core_split_k(n, k, config, x.device.index if x.is_cuda else None)
    k_per_split = triton.cdiv(k_blocks, max(1, split_k)) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partials, counters = split_workspace(out, split_k, triton.cdiv(n, config.block_n))
    halves = qweight.view(torch.int16)  # [N, K / 4]
    _int4_mma_kernel[(triton.cdiv(n, config.block_n), split_k)](
        x, halves, scales, zeros, out, partials, counters, m, n, k, k_per_split // block_k, split_k, x.stride(0),
        halves.stride(0), n, GROUP_SIZE=group_size, BLOCK_M=16, BLOCK_N=config.block_n,
        BLOCK_K=block_k, MAGIC=_MAGIC_VALUES[x.dtype], SCALE_AFTER=config.kind == "mms",
        USE_ASM=x.is_cuda and x.dtype in _TRITON_DTYPES, FRACTIONAL_ZEROS=not integer_zeros,
        SPLIT=split_k > 1, num_warps=config.num_warps, num_stages=config.num_stages,
        **launch_options(use_pdl(x)), TILED=tiled,
    )  # fmt: skip
    return out
