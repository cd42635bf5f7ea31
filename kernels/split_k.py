"""Launch shape of the skinny (decode) GEMMs that dequantize weights in registers (``fp8_linear``, ``int4_gemm``).

At M <= 16 a GEMM is one pass over its weight, so it needs enough programs to keep every SM's memory pipe busy (about
two per SM). Narrower output blocks give more programs for free; splitting K also does, but costs fp32 partial sums
and a reduction afterwards, so it is the last resort: small layers only. The tensor-core kernels reduce their partials
in the kernel (:func:`store_split_partial`: the last program of a column block to finish adds them up), so a split
costs fp32 stores and one atomic per program, not a launch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from kernels.backend import num_sms

if TYPE_CHECKING:
    from kernels.skinny_gemm import SkinnyConfig

PROGRAMS_PER_SM = 2


def decode_launch(n: int, k_blocks: int, device_index: int | None, block_ns: tuple[int, ...] = (64, 32, 16)
                  ) -> tuple[int, int]:  # fmt: skip
    """``(block_n, split_k)``: the widest block in ``block_ns`` (descending) giving ``PROGRAMS_PER_SM`` programs per
    SM; else the narrowest, unsplit if that still covers every SM once, split over just enough programs if not."""
    sms = num_sms(device_index)
    for block_n in block_ns:
        if triton.cdiv(n, block_n) >= PROGRAMS_PER_SM * sms:
            return block_n, 1
    block_n = block_ns[-1]
    n_blocks = triton.cdiv(n, block_n)
    if n_blocks >= sms:
        return block_n, 1
    return block_n, max(1, min(k_blocks, triton.cdiv(PROGRAMS_PER_SM * sms, n_blocks)))


def tensor_core_split_k(n: int, k: int, config: SkinnyConfig, device_index: int | None) -> int:
    """K splits for a tensor-core decode config (fp8 ``mma`` / ``mmq``, int4 ``mma`` / ``mms``): the config's own
    ``:kS`` where a sweep pinned one, else :func:`decode_launch`'s rule at the config's fixed block_n (1 where the
    output blocks already cover every SM, else just enough programs for ``PROGRAMS_PER_SM`` per SM); at most
    ``MAX_SPLIT_K``."""
    if config.split_k:
        return min(config.split_k, MAX_SPLIT_K.value)
    split = decode_launch(n, triton.cdiv(k, config.block_k), device_index, block_ns=(config.block_n,))[1]
    return min(split, MAX_SPLIT_K.value)


# ------------------------------------------------------- split-K partials reduced in the kernel (no extra launch)

MAX_SPLIT_K = tl.constexpr(16)  # K splits the in-kernel reduction adds up (unrolled)
MAX_COLUMN_BLOCKS = 8192  # arrival counters per device: one per output column block of a launch
_counters: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, column_blocks: int) -> torch.Tensor:
    """The device's int32 arrival counters for :func:`store_split_partial` (zero between launches: the last program
    of each column block resets its own). One buffer per device, so split-K launches must not run concurrently on
    two streams (the engine's graphs and side streams are serialized). Allocated on first use, which must not be
    inside a CUDA graph capture: the buffer would belong to the graph's pool."""
    if column_blocks > MAX_COLUMN_BLOCKS:
        raise ValueError(f"split-K launch with {column_blocks} column blocks; the counters hold {MAX_COLUMN_BLOCKS}")
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the split-K arrival counters are first allocated inside a CUDA graph capture; "
                               "run the GEMM once eagerly (warm-up) before capturing")
        counters = _counters[device] = torch.zeros(MAX_COLUMN_BLOCKS, dtype=torch.int32, device=device)
    return counters


def split_workspace(out: torch.Tensor, split_k: int, column_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partials, counters)`` for a launch that ends in :func:`store_split_partial`: fp32 ``[split_k, M, N]``
    partial sums (``out`` itself, unread, when K is not split) and the device's arrival counters."""
    if not 1 <= split_k <= MAX_SPLIT_K.value:
        raise ValueError(f"split_k must be 1 .. {MAX_SPLIT_K.value} (the in-kernel reduction's unroll), got {split_k}")
    partials = out if split_k == 1 else torch.empty((split_k, *out.shape), dtype=torch.float32, device=out.device)
    return partials, arrival_counters(out.device, column_blocks)


@triton.jit
def store_split_partial(y, out_ptr, partial_ptr, counter_ptr, pid_n, pid_k, split_k, M, N, stride_om,
                        SPLIT: tl.constexpr):  # fmt: skip
    """Store a program's fp32 ``y [BLOCK_M, BLOCK_N]``, its K split's share of output rows ``0 .. BLOCK_M`` and
    columns ``pid_n * BLOCK_N ..``. Unsplit (``SPLIT`` False: a constexpr, so no epilogue branch) straight to ``out``;
    split, to ``partial_ptr [split_k, M, N]``, and the column block's last program to arrive (an atomic counter) adds
    the splits up in order 0 .. split_k - 1 (the same bits whichever program is last), writes ``out`` and resets the
    counter: no reduction launch after the GEMM. The sum is unrolled over ``MAX_SPLIT_K`` masked loads in a flat
    layout of its own: a runtime loop there, or y's MMA layout, made ptxas rematerialize addresses inside the caller's
    K loop (~8% more instructions per tile, ``benchmarks/int4_gemm_sass.py``)."""
    offs_m = tl.arange(0, y.shape[0])
    offs_n = pid_n * y.shape[1] + tl.arange(0, y.shape[1])
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if not SPLIT:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        partial_ptrs = partial_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial_ptrs + pid_k * M * N, y, mask=mask)
        add_up_if_last(out_ptr, partial_ptr, counter_ptr, pid_n, split_k, M, N, stride_om, y.shape[0], y.shape[1])


@triton.jit
def add_up_if_last(out_ptr, partial_ptr, counter_ptr, pid_n, split_k, M, N, stride_om, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):  # fmt: skip
    """Called by each of the ``split_k`` programs sharing column block ``pid_n`` once its partial is stored in
    ``partial_ptr [split_k, M, N]``: the last to arrive adds the splits up in order, writes ``out`` and resets the
    block's counter."""
    tl.debug_barrier()  # every thread's partial is written before the release below publishes them
    arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if arrived == split_k - 1:
        flat = tl.arange(0, BLOCK_M * BLOCK_N)
        rows = flat // BLOCK_N
        cols = pid_n * BLOCK_N + flat % BLOCK_N
        total = tl.zeros(flat.shape, dtype=tl.float32)
        for s in tl.static_range(MAX_SPLIT_K):
            split_rows = tl.where(s < split_k, M, 0)  # (s < split_k) & ..., in a form the interpreter takes
            total += tl.load(partial_ptr + s * M * N + rows * N + cols, mask=(rows < split_rows) & (cols < N),
                             other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + rows * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=(rows < M) & (cols < N))
        tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")
