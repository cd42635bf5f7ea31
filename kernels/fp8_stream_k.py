"""Stream-K W8A8 decode GEMM: one persistent launch whose programs split the whole weight evenly.

At M <= 16 a GEMM is one pass over its weight. The one-program-per-tile kernel (``_fp8_mma_kernel``) leaves that
pass uneven: gate_up's 224 column blocks are 1.7 programs per SM, so 40 SMs idle through the second half, and small
layers need K splits to have programs at all. Here the ``column blocks x K tiles`` iterations are cut into
``programs`` contiguous, equal ranges (stream-K). Each program walks its range in one software-pipelined loop, so
its loads run ahead across the column blocks it crosses. A column block that one program covers whole goes straight
to ``out``; one shared by several programs (only a range's first and last can be; at most ``MAX_SPLIT_K``) is stored
as fp32 partials and added up, in program order, by the last to arrive (``kernels/split_k.py: add_up_if_last``).
Same numerics as ``_fp8_mma_kernel`` (e4m3 x e4m3 on the tensor cores, fp32 accumulation, ``x_scale[m] * w_scale[n]``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import num_sms
from kernels.fp8_quant import FP8_MAX, FP8_MIN_SCALE, row_scales, to_e4m3
from kernels.pdl import launch_options, use_pdl, wait_then_release
from kernels.skinny_gemm import _prefetch_l2
from kernels.split_k import MAX_SPLIT_K, add_up_if_last, arrival_counters


def stream_k_programs(column_blocks: int, k_tiles: int, programs: int) -> int:
    """The launch's program count: at most ``programs``, at most one per K-tile iteration, and few enough that no
    column block is shared by more than ``MAX_SPLIT_K`` programs (each program's range is then at least
    ``k_tiles / (MAX_SPLIT_K - 1)`` iterations long)."""
    total = column_blocks * k_tiles
    min_iters = triton.cdiv(k_tiles, MAX_SPLIT_K.value - 1)
    return max(1, min(programs, total, total // min_iters))


@triton.jit
def _owner(iteration, programs, total):
    """The program whose range ``[p * total // programs, (p + 1) * total // programs)`` holds ``iteration``."""
    return ((iteration + 1) * programs - 1) // total


@triton.jit
def _sharers(block, k_tiles, programs, total):
    """``(first, count)``: the first program whose range touches column block ``block``, and how many do."""
    first = _owner(block * k_tiles, programs, total)
    return first, _owner(block * k_tiles + k_tiles - 1, programs, total) - first + 1


@triton.jit
def _fp8_stream_k_kernel(x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, out_ptr, partial_ptr, counter_ptr, M, N, K,
                         k_tiles, total, stride_xm, stride_wn, stride_om, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                         NUM_STAGES: tl.constexpr, QUANT_X: tl.constexpr, FP8_MAX: tl.constexpr,
                         MIN_SCALE: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
    """Program p: iterations ``[p * total // P, (p + 1) * total // P)`` of ``column block = i // k_tiles``, ``K tile
    = i % k_tiles``; ``x_ptr`` e4m3 bits ``[M, K]`` with per-row ``x_scale_ptr``, ``w_ptr`` e4m3 bits ``[N, K]``.
    ``QUANT_X``: ``x_ptr`` is the unquantized activations, quantized per token here the way ``_fp8_mma_kernel``'s
    ``mmq`` does (the row's absmax first, then each tile divided and cast: the quantize kernel's bits).
    ``USE_PDL`` (launched with programmatic dependent launch): ask L2 for the range's first two weight tiles, which no
    kernel writes, then wait for the previous kernel (``griddepcontrol.wait``) before reading x or the counters."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    start = (pid * total) // programs
    end = ((pid + 1) * total) // programs
    offs_m = tl.arange(0, BLOCK_M)
    offs_bn = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if USE_PDL:
        pf_cols = tl.arange(0, BLOCK_K // 128 if BLOCK_K >= 128 else 1) * 128
        for t in tl.static_range(2):
            it0 = tl.minimum(start + t, end - 1)
            block0 = it0 // k_tiles
            rows0 = tl.minimum(block0 * BLOCK_N + offs_bn, N - 1).to(tl.int64) * stride_wn
            _prefetch_l2(w_ptr + rows0[:, None] + ((it0 - block0 * k_tiles) * BLOCK_K + pf_cols)[None, :])
    wait_then_release(USE_PDL)
    x_rows = tl.minimum(offs_m, M - 1)  # padding rows re-read row M-1 and are never stored
    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :]
    if QUANT_X:
        x_scale = row_scales(x_ptrs, K, offs_k, FP8_MAX, MIN_SCALE)
    else:
        x_scale = tl.load(x_scale_ptr + x_rows)
    w_offsets = offs_bn[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in tl.range(start, end, num_stages=NUM_STAGES):
        block = it // k_tiles
        k0 = (it - block * k_tiles) * BLOCK_K
        if EVEN_N:
            w_ptrs = w_ptr + (block * BLOCK_N).to(tl.int64) * stride_wn + k0 + w_offsets
        else:  # tail rows re-read row N-1 and are never stored
            rows = tl.minimum(block * BLOCK_N + offs_bn, N - 1).to(tl.int64)
            w_ptrs = w_ptr + rows[:, None] * stride_wn + k0 + offs_k[None, :]
        if EVEN_K:
            x_in = tl.load(x_ptrs + k0)
            w_bits = tl.load(w_ptrs)
        else:
            k_mask = k0 + offs_k < K
            x_in = tl.load(x_ptrs + k0, mask=k_mask[None, :], other=0)
            w_bits = tl.load(w_ptrs, mask=k_mask[None, :], other=0)
        if QUANT_X:
            x = to_e4m3(x_in.to(tl.float32), x_scale[:, None], FP8_MAX)
        else:
            x = x_in.to(tl.float8e4nv, bitcast=True)
        acc = tl.dot(w_bits.to(tl.float8e4nv, bitcast=True), tl.trans(x), acc, out_dtype=tl.float32)
        if (k0 + BLOCK_K >= K) | (it == end - 1):  # this program's share of the column block is done
            first, sharers = _sharers(block, k_tiles, programs, total)
            cols = block * BLOCK_N + offs_bn
            w_scale = tl.load(w_scale_ptr + cols, mask=cols < N, other=0.0)
            y = tl.trans(acc * w_scale[:, None] * x_scale[None, :])
            mask = (offs_m < M)[:, None] & (cols < N)[None, :]
            if sharers == 1:  # plain stores only in the loop: an atomic or a barrier here stops the pipelining
                tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty),
                         mask=mask)
            else:
                tl.store(partial_ptr + (pid - first) * M * N + offs_m[:, None] * N + cols[None, :], y, mask=mask)
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # Only the range's first and last column blocks can be shared: arrive at those, the last arrival adds them up.
    first_block = start // k_tiles
    last_block = (end - 1) // k_tiles
    _arrive(first_block, out_ptr, partial_ptr, counter_ptr, programs, total, k_tiles, M, N, stride_om, BLOCK_M,
            BLOCK_N)
    if last_block != first_block:
        _arrive(last_block, out_ptr, partial_ptr, counter_ptr, programs, total, k_tiles, M, N, stride_om, BLOCK_M,
                BLOCK_N)


@triton.jit
def _arrive(block, out_ptr, partial_ptr, counter_ptr, programs, total, k_tiles, M, N, stride_om, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr):  # fmt: skip
    sharers = _sharers(block, k_tiles, programs, total)[1]
    if sharers > 1:
        add_up_if_last(out_ptr, partial_ptr, counter_ptr, block, sharers, M, N, stride_om, BLOCK_M, BLOCK_N)


def fp8_stream_k_gemm(xq: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor,
                      weight_scale: torch.Tensor, out_dtype: torch.dtype, *, block_n: int, block_k: int,
                      num_warps: int, num_stages: int, programs_per_sm: int = 1,
                      programs: int | None = None) -> torch.Tensor:  # fmt: skip
    """``(xq * x_scale) @ (weight * weight_scale[:, None])^T`` in ``out_dtype``: ``xq`` e4m3 ``[M <= 16, K]`` (unit
    column stride) with fp32 per-row scales ``[M, 1]``, ``weight`` e4m3 ``[N, K]`` with fp32 ``[N]`` scales. With
    ``x_scale`` None, ``xq`` is the unquantized activations, quantized per token inside the kernel (dynamic scales:
    the same bits as ``quantize_activations_triton``). ``programs`` (default ``programs_per_sm`` per SM) is capped by
    :func:`stream_k_programs`. Launched with PDL where ``kernels/pdl.py`` says so."""
    m, k = xq.shape
    n = weight.shape[0]
    if m > 16:
        raise ValueError(f"fp8_stream_k_gemm takes at most 16 rows, got {m}.")
    if weight.shape[1] != k:
        raise ValueError(f"fp8 weight {tuple(weight.shape)} does not match x {tuple(xq.shape)}")
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    bits = weight.view(torch.uint8)
    if bits.stride(1) != 1:
        bits = bits.contiguous()
    column_blocks = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    if programs is None:
        programs = programs_per_sm * num_sms(xq.device.index if xq.is_cuda else None)
    grid = stream_k_programs(column_blocks, k_tiles, programs)
    partials = torch.empty((MAX_SPLIT_K.value, m, n), dtype=torch.float32, device=xq.device)
    counters = arrival_counters(xq.device, column_blocks)
    quant_x = x_scale is None
    pdl = use_pdl(xq)
    x_bits, scales = (xq, weight_scale) if quant_x else (xq.view(torch.uint8), x_scale)  # x_scale_ptr unread: quant_x
    _fp8_stream_k_kernel[(grid,)](
        x_bits, scales, bits, weight_scale, out, partials, counters, m, n, k, k_tiles, column_blocks * k_tiles,
        xq.stride(0), bits.stride(0), out.stride(0), BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, EVEN_N=n % block_n == 0, NUM_STAGES=num_stages, QUANT_X=quant_x,
        FP8_MAX=FP8_MAX, MIN_SCALE=FP8_MIN_SCALE, num_warps=num_warps,
        **launch_options(pdl),
    )  # fmt: skip
    return out
