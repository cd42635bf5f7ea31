"""Decode GEMMs over fp8 (e4m3) weights for a few rows (M <= 8), written in Gluon so that each thread loads exactly
its own tensor-core fragments of the weight, 16 bytes at a time, and widens them in place.

Why: at M = 1 a GEMM is a pass over the weight, and its floor is the weight's bytes over HBM bandwidth. The Triton
decode kernels (``kernels/fp8_linear.py``) reach 41-76% of it on the H200: the ``fma`` kernel is bound by issuing
the per-weight widening, the ``mma`` one by latency (few programs, 17% occupancy, the weight staged through shared
memory for wgmma). Here:

- **The K order permuted.** The mma sums over k, so any order of k works if both operands use it. In the fp16
  ``mma.sync.m16n8k16`` A fragment a thread holds, of rows ``g`` and ``g + 8`` (``g`` = lane // 4), the k values
  ``2t + e + 8h + 16s`` (``t`` = lane % 4, ``e``, ``h`` < 2, ``s``: the k16 step). The kernel reads logical k
  ``16s + 8h + 2t + e`` of each 128-byte chunk from byte ``32t + 4s + 2h + e``, so each thread's bytes of a row
  are 32 contiguous bytes (two 16-byte loads), and the B fragment (x, the token rows as the mma's N, padded to 8)
  is read through the same map. e4m3 -> fp16 is one packed ``cvt`` per two values (exact), in registers; the
  relabelling is a reshape + permute and ``convert_layout(..., assert_trivial=True)``: no data moves.
  (Gluon's ``mma_v2`` on e4m3 operands widens and repacks them itself on sm_90: 6x the loop instructions.)
- **Warps split K.** A program owns 16 weight rows (the mma's M); each of its warps walks its own part of K with a
  batched 3-D ``mma_v2`` (the warp as the batch dimension), and the warps' partial sums are added once at the end.
  Per 2 KB of weight a warp issues 6 loads (4 of weight, 2 of x), 48 conversions and 8 mma: 86 instructions
  (``benchmarks/gluon_gemv_sass.py``). Each step loads and uses its own tiles: carrying loaded bytes across
  iterations (a register double buffer) makes the compiler split them into single bytes.
- W8A8 numerics (``fp8_linear_ref``): x quantized per token to e4m3 (given, from the kernel that made x:
  ``Fp8Activations``, or quantized here from bf16 / fp16 x with the quantize kernel's formula), fp32 accumulation,
  ``x_scale[m] * w_scale[n]`` at the end.
- Measured on the H200 (Llama-8B, M = 1; RESULTS.md, fifteenth session): qkv 9.8 us, o 6.8, gate_up 31.3, down
  18.5, 93% of a read-only kernel's time per GEMM; ``kernels/fp8_linear.py`` picks it per shape.
- **Weight on its way before the PDL wait**: ``GemvConfig.preload`` steps into registers, ``GemvConfig.staged``
  more into shared memory (cp.async, read once after the wait). Llama-8B's down projection stages one: measured
  when its wait was the one-program SiLU-and-mul kernel's ~6 us, which two register steps did not fill (W3-fp8
  step -2.3%; that kernel is now gate_up's epilogue, below). More staged steps, or staging anywhere else, measured
  slower (RESULTS.md, twenty-third session); so did streaming the whole loop through a shared-memory ring (two CTA
  barriers a step).
- **A qkv epilogue** (:func:`gluon_fp8_gemv_rope_cache`): the rows of a program are picked so that each thread's
  rows ``g`` and ``g + 8`` are a rotary pair, and the epilogue does ``attention_prep``'s work: q rotated, k rotated
  and v into the paged cache. One launch fewer per layer (W3-fp8 +0.5%, RESULTS.md, sixteenth session).
- **A SiLU-and-mul epilogue and rows quantized once** (:func:`gluon_fp8_gemv_silu_mul`, ``GemvConfig.quantize_once``):
  gate_up's programs pair 8 gate rows with the 8 up rows of the same columns (rows ``g`` and ``g + 8`` of a
  thread) and store ``silu(gate) * up``; down's programs quantize those rows per token after their wait, each the
  whole row (its absmax needs all of it), into a scratch row in global memory that the unchanged K loop reads as
  it reads rows quantized upstream. The one-program SiLU-and-mul + quantization kernel between them is gone; the
  bits are the three-kernel path's.
- **An RMSNorm prologue** (``RowNorm``): the rows quantized once are first ``x + residual`` (program 0 stores that
  sum for the next layer) RMS-normed with the norm's weight, with ``kernels/rmsnorm.py``'s roundings: the qkv
  GEMV takes the decoder layer's input norm, so the one-program RMSNorm kernel before it is gone too.

Gluon has no interpreter: on the CPU the Triton kernels run; the GPU tests compare this kernel with
``fp8_linear_ref``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from kernels.fp8_quant import FP8_MAX, FP8_MIN_SCALE
from kernels.gemv_rows_gluon import RowNorm, rope_epilogue_args
from kernels.pdl import launch_options, use_pdl

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

    # cp.async global -> shared: Triton 3.6 calls it async_copy_global_to_shared, later versions async_load
    _cp_async = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared
    HAS_GLUON = True
except ImportError:  # pragma: no cover - a Triton without Gluon
    HAS_GLUON = False

MAX_M = 8  # token rows: the mma's N
ROWS = 16  # weight rows per program: the mma's M
CHUNK = 128  # bytes of a weight row per warp per chunk: 8 k16 steps, 32 contiguous bytes per thread


class GemvConfig(NamedTuple):
    """Warps per program (each its own part of K), 128-byte chunks per warp per loop step (the bytes each thread
    has in flight: 64 per chunk), whether unquantized (bf16 / fp16) rows are served too, quantized inside the
    kernel (slower per byte than rows quantized upstream: measured per shape), and how many loop steps of weight
    (0-2) a PDL-launched program loads into registers before it waits on the kernel before it: those bytes stream
    while that kernel runs, and the first mma goes out as soon as x is there. Where none can (K not whole steps, or
    no PDL) the program asks L2 for its first step instead. ``staged``: that many steps after those are copied into
    shared memory (cp.async) before the wait too, so more of the weight streams while the kernel before runs than
    registers hold; the loop reads the rest from global memory as usual. ``quantize_once``: unquantized rows are
    served by quantizing them once per program after the wait into a scratch row the loop reads like rows
    quantized upstream (the kernel before then need not quantize: the gate_up GEMV's SiLU-and-mul epilogue)."""

    warps: int = 4
    chunks: int = 2
    quantize_x: bool = False
    preload: int = 2
    staged: int = 0
    quantize_once: bool = False

    @property
    def step(self) -> int:
        """Bytes of each weight row one loop step reads (the kernel's ``STEP``)."""
        return self.warps * self.chunks * CHUNK


def _fragment_layout(warps: int, chunks: int, rows: int):
    """A ``[warp, row, byte]`` tile of ``chunks`` 128-byte chunks per warp, each thread holding 32 contiguous bytes
    (at ``32 (lane % 4)``) of row ``lane // 4`` (and ``+ 8`` when ``rows`` is 16) of every chunk."""
    reg_bases = [[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8], [0, 0, 16]]
    if rows == 16:
        reg_bases.append([0, 8, 0])
    reg_bases += [[0, 0, CHUNK << i] for i in range(chunks.bit_length() - 1)]
    lane_bases = [[0, 0, 32], [0, 0, 64], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
    warp_bases = [[1 << i, 0, 0] for i in range(warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=reg_bases, lane_bases=lane_bases, warp_bases=warp_bases,
                                      block_bases=[], shape=[warps, rows, CHUNK * chunks])


@functools.cache
def gemv_layouts(warps: int, chunks: int) -> tuple:
    """The weight tile's and the x tile's load layouts and the accumulator's (mma v2) layout."""
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1, 1], instr_shape=[1, 16, 8])
    return _fragment_layout(warps, chunks, ROWS), _fragment_layout(warps, chunks, MAX_M), mma


if HAS_GLUON:
    from kernels.gemv_rows_gluon import (
        _e4m3_bits,
        _norm_rows_once,
        _quantize_rows_once,
        _rope_cache_epilogue,
        _rope_inputs,
        _rows_of,
        _silu_mul_epilogue,
    )
    from kernels.task_order import inputs_ready

    @gluon.jit
    def _logical_k(tile, WARPS: gl.constexpr, R: gl.constexpr, CHUNKS: gl.constexpr):
        """Widen a loaded ``[warp, row, byte]`` e4m3 tile to fp16 and relabel its last dim to logical k: byte
        ``32t + 4s + 2h + e`` of a chunk is k ``16s + 8h + 2t + e``."""
        t = gl.reshape(tile.to(gl.float8e4nv, bitcast=True).to(gl.float16), [WARPS, R, CHUNKS, 4, 8, 2, 2])
        return gl.reshape(gl.permute(t, [0, 1, 2, 4, 5, 3, 6]), [WARPS, R, CHUNKS * 128])

    @gluon.jit
    def _prefetch_first_steps(w_ptr, pid, N, K, stride_wn, PAIRED_ROWS, GATED_D, BYTES: gl.constexpr,
                              WARPS: gl.constexpr, HEAD_DIM: gl.constexpr, SILU_MUL: gl.constexpr):  # fmt: skip
        """Ask L2 for the program's first ``BYTES`` of each of its 16 weight rows (one address per 128-byte line):
        what a PDL-launched GEMM does before it waits on the kernel before it when it cannot load whole steps into
        registers there (``GemvConfig.preload``), since that kernel's few microseconds leave HBM idle."""
        LINES: gl.constexpr = BYTES // 128
        idx = gl.arange(0, 16 * LINES, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
        row = gl.minimum(_rows_of(pid, idx // LINES, PAIRED_ROWS, GATED_D, HEAD_DIM, SILU_MUL), N - 1)
        row = row.to(gl.int64) * stride_wn
        ptrs = w_ptr + row + gl.minimum((idx % LINES) * 128, K - 1)
        gl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _token_scales(amax, X_TILE: gl.constexpr, FP8_MAX: gl.constexpr, MIN_SCALE: gl.constexpr):
        """Per-token e4m3 scales from an x tile's elementwise absmax (``kernels/fp8_quant.py: e4m3_row_scale``'s
        formula): the scales, and their reciprocals broadcastable over the x tile (``_e4m3_bits``' multiplier)."""
        x_scale = gl.maximum(gl.max(gl.max(amax, axis=2), axis=0) / FP8_MAX, MIN_SCALE)
        inv_scale = 1.0 / gl.convert_layout(x_scale, gl.SliceLayout(0, gl.SliceLayout(2, X_TILE)))
        return x_scale, inv_scale[None, :, None]

    @gluon.jit
    def _x_step(x_ptrs, k0, x_live, x_k, K, inv_scale_k, QUANT_X: gl.constexpr):
        """x's e4m3 tile for the loop step at byte ``k0``: loaded as it is, or (``QUANT_X``) loaded and quantized with
        the per-token scales (their reciprocals ``inv_scale_k``)."""
        if QUANT_X:
            xv = gl.load(x_ptrs + k0, mask=x_live & (x_k + k0 < K), other=0.0).to(gl.float32)
            return _e4m3_bits(xv, inv_scale_k)
        else:
            return gl.load(x_ptrs + k0, mask=x_live & (x_k + k0 < K), other=0)

    @gluon.jit
    def _mma_step(w8, x8, acc, WARPS: gl.constexpr, CHUNKS: gl.constexpr, MMA: gl.constexpr):
        """``acc += w8 @ x8^T`` over a step's chunks: both e4m3 tiles (as loaded) widened to fp16 and relabelled
        into the mma fragments in place."""
        dot_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        dot_b: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
        a = gl.convert_layout(_logical_k(w8, WARPS, 16, CHUNKS), dot_a, assert_trivial=True)
        b = gl.convert_layout(gl.permute(_logical_k(x8, WARPS, 8, CHUNKS), [0, 2, 1]), dot_b, assert_trivial=True)
        return mma_v2(a, b, acc)

    @gluon.jit
    def _gemv_kernel(task, x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                     positions_ptr, cos_sin_ptr, stride_cs, slot_ptr, k_cache_ptr, v_cache_ptr, stride_kcb,
                     stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, Q_ROWS, KV_ROWS, scratch_ptr,
                     GATED_D, res_ptr, res_out_ptr, nw_ptr, eps, WARPS: gl.constexpr, CHUNKS: gl.constexpr,
                     W_TILE: gl.constexpr, X_TILE: gl.constexpr,
                     MMA: gl.constexpr, EVEN_K: gl.constexpr, QUANT_X: gl.constexpr, SINGLE_STEP: gl.constexpr,
                     PREFETCH_STEPS: gl.constexpr, PRELOAD: gl.constexpr, FP8_MAX: gl.constexpr,
                     MIN_SCALE: gl.constexpr, ROPE_CACHE: gl.constexpr, HEAD_DIM: gl.constexpr,
                     BLOCK_SIZE: gl.constexpr, USE_PDL: gl.constexpr, STAGED: gl.constexpr = 0,
                     STAGED_LAYOUT: gl.constexpr = None, SILU_MUL: gl.constexpr = False,
                     QUANT_ONCE: gl.constexpr = False, PIECES: gl.constexpr = 1,
                     SLOTS: gl.constexpr = 1, NORM: gl.constexpr = 0, wait_ptr=None, wait_target=0,
                     WAIT_COUNTER: gl.constexpr = False):  # fmt: skip
        """Program ``pid``: ``out[:, 16 pid : 16 pid + 16] = (xq @ w[16 pid : 16 pid + 16]^T) * x_scale * w_scale``;
        ``pid`` is the program id when launched (``task`` None), else ``task`` (a task of another launch's program:
        ``kernels/fp8_mlp_gluon.py``).
        ``QUANT_X``: ``x_ptr`` holds the unquantized rows (quantized here per token), else their e4m3 bits.
        ``SINGLE_STEP`` (``QUANT_X`` with K within one step): x is loaded once and quantized in registers, and the
        weight's loads go out before the PDL wait. Otherwise ``PRELOAD`` steps of weight are loaded before that wait
        (else, with ``PREFETCH_STEPS``, asked of L2): see :func:`prologue_steps`; ``STAGED`` steps after them are copied
        into shared memory there too (``GemvConfig.staged``). ``ROPE_CACHE``: a qkv GEMM whose
        epilogue is the attention prep (``_rope_cache_epilogue``; ``out_ptr`` is q's ``[M, Q_ROWS]``); the arguments
        after ``stride_om`` up to ``KV_ROWS`` serve only it. ``SILU_MUL``: a ``[gate | up]`` GEMM (``2 GATED_D``
        rows) whose epilogue is ``silu_and_mul`` (``out_ptr`` ``[M, GATED_D]``). ``QUANT_ONCE``: ``x_ptr`` holds
        unquantized rows, quantized per token once after the wait into ``scratch_ptr`` (``SLOTS`` rows of
        ``[M, K]``, shared by programs ``SLOTS`` apart) and read from there by the K loop; ``NORM`` (1, or 2 with
        the residual add): the rows are first RMS-normed with ``nw_ptr`` (``_norm_rows_once``). ``WAIT_COUNTER``:
        the inputs are ready once ``wait_ptr`` reaches ``wait_target`` (tasks of one launch, ``kernels/task_order.py``),
        after the PDL wait where there is one."""
        if task is None:
            pid = gl.program_id(0)
        else:
            pid = task
        STEP: gl.constexpr = WARPS * CHUNKS * 128
        PAIRED_ROWS = Q_ROWS + KV_ROWS if ROPE_CACHE else 0

        w_warps = gl.arange(0, WARPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, W_TILE)))
        w_rows = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, W_TILE)))
        w_bytes = gl.arange(0, CHUNKS * 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, W_TILE)))
        rows = _rows_of(pid, w_rows, PAIRED_ROWS, GATED_D, HEAD_DIM, SILU_MUL)
        rows = gl.minimum(rows, N - 1).to(gl.int64) * stride_wn  # tail rows re-read, never stored
        w_k = (w_warps * (CHUNKS * 128))[:, None, None] + w_bytes[None, None, :]
        w_ptrs = w_ptr + rows[None, :, None] + w_k

        x_warps = gl.arange(0, WARPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, X_TILE)))
        x_rows = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, X_TILE)))
        x_bytes = gl.arange(0, CHUNKS * 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, X_TILE)))
        x_k = (x_warps * (CHUNKS * 128))[:, None, None] + x_bytes[None, None, :]
        if QUANT_ONCE:  # the loop reads the rows this program quantizes after its wait
            q_rows_ptr = scratch_ptr + (pid % SLOTS) * M * K
            x_ptrs = q_rows_ptr + (gl.minimum(x_rows, M - 1) * K)[None, :, None] + x_k
        else:
            x_ptrs = x_ptr + (gl.minimum(x_rows, M - 1) * stride_xm)[None, :, None] + x_k
        x_live = (x_rows < M)[None, :, None]

        o_rows = _rows_of(pid, gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(0, MMA))), PAIRED_ROWS,
                          GATED_D, HEAD_DIM, SILU_MUL)  # fmt: skip
        o_tokens = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, MMA)))
        if ROPE_CACHE:
            slot, cos, sin = _rope_inputs(o_rows, o_tokens, M, positions_ptr, cos_sin_ptr, stride_cs, slot_ptr,
                                          HEAD_DIM)  # fmt: skip
        acc = gl.zeros([WARPS, 16, 8], gl.float32, layout=MMA)
        # The weight's scales (never written by a kernel) before the PDL wait, x's right after it: neither load is
        # then the program's tail.
        w_scale = gl.load(w_scale_ptr + o_rows, mask=o_rows < N, other=0.0)
        if SINGLE_STEP:  # the whole of K in one step: x's rows are loaded once, and quantized in registers
            if EVEN_K:  # the weight is never written by a kernel: its loads go out before the wait
                w8 = gl.load(w_ptrs)
            else:
                w8 = gl.load(w_ptrs, mask=w_k < K, other=0)
            inputs_ready(USE_PDL, WAIT_COUNTER, wait_ptr, wait_target)
            xv = gl.load(x_ptrs, mask=x_live & (x_k < K), other=0.0).to(gl.float32)
            x_scale, inv_scale_k = _token_scales(gl.abs(xv), X_TILE, FP8_MAX, MIN_SCALE)
            acc = _mma_step(w8, _e4m3_bits(xv, inv_scale_k), acc, WARPS, CHUNKS, MMA)
        else:
            # PRELOAD (0-2, the host's pick: whole steps only, with PDL): that many steps of weight loaded into
            # registers before the wait and multiplied right after it (and after x's scales). Peeled off the loop: a
            # loop-carried tile of loaded bytes makes the compiler repack them byte by byte.
            if PRELOAD > 0:
                w8_first = gl.load(w_ptrs, eviction_policy="evict_first")
            if PRELOAD > 1:
                w8_second = gl.load(w_ptrs + STEP, eviction_policy="evict_first")
            if STAGED > 0:  # the next STAGED steps on their way into shared memory before the wait too
                staged = gl.allocate_shared_memory(gl.uint8, [STAGED, WARPS, 16, CHUNKS * 128], STAGED_LAYOUT)
                for i in gl.static_range(STAGED):
                    _cp_async(staged.index(i), w_ptrs + (PRELOAD + i) * STEP, mask=w_k + (PRELOAD + i) * STEP < K)
                async_copy.commit_group()
            if USE_PDL:
                if PREFETCH_STEPS > 0:
                    _prefetch_first_steps(w_ptr, pid, N, K, stride_wn, PAIRED_ROWS, GATED_D, STEP * PREFETCH_STEPS,
                                          WARPS, HEAD_DIM, SILU_MUL)
            inputs_ready(USE_PDL, WAIT_COUNTER, wait_ptr, wait_target)
            if NORM > 0:
                t_scale = _norm_rows_once(x_ptr, stride_xm, res_ptr, res_out_ptr, nw_ptr, eps, q_rows_ptr, M, K, pid,
                                          o_tokens, WARPS, PIECES, NORM == 2, FP8_MAX, MIN_SCALE)  # fmt: skip
            elif QUANT_ONCE:
                t_scale = _quantize_rows_once(x_ptr, stride_xm, q_rows_ptr, M, K, o_tokens, WARPS, PIECES, FP8_MAX,
                                              MIN_SCALE)  # fmt: skip
            elif not QUANT_X:
                t_scale = gl.load(x_scale_ptr + o_tokens, mask=o_tokens < M, other=0.0)
            inv_scale_k = 1.0  # x quantized upstream: unused
            if QUANT_X:  # per-token scales from one pass over x's rows (a few KB, in L2)
                amax = gl.zeros([WARPS, 8, CHUNKS * 128], gl.float32, layout=X_TILE)
                for k0 in range(0, K, STEP):
                    xv = gl.load(x_ptrs + k0, mask=x_live & (x_k + k0 < K), other=0.0).to(gl.float32)
                    amax = gl.maximum(amax, gl.abs(xv))
                x_scale, inv_scale_k = _token_scales(amax, X_TILE, FP8_MAX, MIN_SCALE)
            if PRELOAD > 0:
                acc = _mma_step(w8_first, _x_step(x_ptrs, 0, x_live, x_k, K, inv_scale_k, QUANT_X), acc, WARPS, CHUNKS,
                                MMA)  # fmt: skip
            if PRELOAD > 1:
                acc = _mma_step(w8_second, _x_step(x_ptrs, STEP, x_live, x_k, K, inv_scale_k, QUANT_X), acc, WARPS,
                                CHUNKS, MMA)  # fmt: skip
            k_loop = STEP * PRELOAD
            if STAGED > 0:  # the staged steps, then the loop's first step (its loads out before their mma: the
                # staged steps' math would otherwise leave HBM idle)
                w8_next = gl.load(w_ptrs + (k_loop + STAGED * STEP), mask=w_k + (k_loop + STAGED * STEP) < K, other=0,
                                  eviction_policy="evict_first")  # fmt: skip
                async_copy.wait_group(0)
                for i in gl.static_range(STAGED):
                    acc = _mma_step(staged.index(i).load(W_TILE), _x_step(x_ptrs, k_loop + i * STEP, x_live, x_k, K,
                                                                          inv_scale_k, QUANT_X), acc, WARPS, CHUNKS,
                                    MMA)  # fmt: skip
                k_loop += STAGED * STEP
                acc = _mma_step(w8_next, _x_step(x_ptrs, k_loop, x_live, x_k, K, inv_scale_k, QUANT_X), acc, WARPS,
                                CHUNKS, MMA)  # fmt: skip
                k_loop += STEP
            for k0 in range(k_loop, K, STEP):
                if EVEN_K:  # evict_first: the weight is read once per step, x and the outputs are reused
                    w8 = gl.load(w_ptrs + k0, eviction_policy="evict_first")
                else:
                    w8 = gl.load(w_ptrs + k0, mask=w_k + k0 < K, other=0, eviction_policy="evict_first")
                acc = _mma_step(w8, _x_step(x_ptrs, k0, x_live, x_k, K, inv_scale_k, QUANT_X), acc, WARPS, CHUNKS, MMA)

        out = gl.sum(acc, axis=0)  # [row, token]: the warps' parts of K added up
        if QUANT_X:
            t_scale = gl.convert_layout(x_scale, gl.SliceLayout(0, gl.SliceLayout(0, MMA)))
        y = out * w_scale[:, None] * t_scale[None, :]
        if ROPE_CACHE:
            _rope_cache_epilogue(y, o_rows, o_tokens, pid, M, out_ptr, stride_om, slot, cos, sin, k_cache_ptr,
                                 v_cache_ptr, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                                 Q_ROWS, KV_ROWS, HEAD_DIM, BLOCK_SIZE)
        elif SILU_MUL:
            _silu_mul_epilogue(y, o_rows, o_tokens, M, out_ptr, stride_om)
        else:
            gl.store(out_ptr + o_tokens[None, :] * stride_om + o_rows[:, None], y.to(out_ptr.dtype.element_ty),
                     mask=(o_rows < N)[:, None] & (o_tokens < M)[None, :])


def gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`gluon_fp8_gemv` serves ``x @ weight^T``: an NVIDIA GPU with fp8 mma.sync (compute capability
    8.9+), at most 8 rows, K a multiple of 16 (16-byte loads) and the weight's rows 16-byte aligned."""
    if not (HAS_GLUON and x.is_cuda and torch.version.hip is None):
        return False
    m, k = x.shape
    if m > MAX_M or k % 16 or weight.stride(-1) != 1 or weight.stride(0) % 16 or weight.data_ptr() % 16:
        return False
    return _has_fp8_conversions(x.device)


@functools.lru_cache(maxsize=None)
def _has_fp8_conversions(device) -> bool:
    """Packed e4m3 -> fp16 conversions: compute capability 8.9+ (asked once per device: eager decode calls this per
    layer)."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def gluon_fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *,
                   x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                   config: GemvConfig | None = None, norm: RowNorm | None = None) -> torch.Tensor:  # fmt: skip
    """W8A8 ``x [M <= 8, K] @ weight[N, K]^T``: ``x`` e4m3 with its per-token ``x_scale`` ``[M, 1]`` (from
    ``Fp8Activations``), or bf16 / fp16 quantized here per token (``x_scale`` None), RMS-normed first with ``norm``.
    ``weight_scale`` fp32 ``[N]``. Callers check :func:`gemv_supported` first."""
    config = config or GemvConfig()
    m, k = x.shape
    n = weight.shape[0]
    quant_x = x_scale is None
    out = torch.empty((m, n), dtype=out_dtype or (x.dtype if quant_x else torch.bfloat16), device=x.device)
    if m == 0 or n == 0:
        return out
    _launch(x, x_scale, weight, weight_scale, out, config, norm=norm)
    return out


def prologue_steps(config: GemvConfig, k: int, single_step: bool, pdl: bool) -> tuple[int, int]:
    """What a program does before its PDL wait: (steps of weight loaded into registers, steps asked of L2). Whole
    steps only are preloaded (the peeled steps take no mask); else the first step goes to L2. A single-step kernel
    (x quantized in registers) loads its one step there anyway; without PDL nothing runs before a wait. Steps staged
    in shared memory are on their way already: L2 is not asked for them again."""
    if not pdl or single_step:
        return 0, 0
    preload = min(config.preload, k // config.step) if k % config.step == 0 else 0
    return preload, 0 if preload or config.staged else 1


QUANT_ONCE_SLOTS = 32  # scratch rows of the quantize-once programs: programs this many apart share one


def _launch(x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, weight_scale: torch.Tensor,
            out: torch.Tensor, config: GemvConfig, rope: tuple | None = None, silu_mul: bool = False,
            norm: RowNorm | None = None) -> None:  # fmt: skip
    """One ``_gemv_kernel`` launch over the weight's rows; ``rope``: the rotary epilogue's
    ``(positions, cos_sin, slot_mapping, k_cache, v_cache, q_rows, kv_rows, head_dim)``; ``silu_mul``: the
    SiLU-and-mul epilogue (``out`` ``[M, N / 2]``); ``norm``: x's rows RMS-normed first (quantized once)."""
    m, k = x.shape
    quant_x = x_scale is None
    xv = x if quant_x else x.view(torch.uint8)
    w_tile, x_tile, mma = gemv_layouts(config.warps, config.chunks)
    step = config.step
    pdl = use_pdl(x)
    single_step = quant_x and k <= step
    quant_once = quant_x and (config.quantize_once or norm is not None) and not single_step
    if norm is not None and not quant_once:
        raise ValueError("the RMSNorm prologue needs unquantized rows over more than one step (quantize_once)")
    norm_args = (x, x, x, 0.0)  # placeholders NORM = 0 never reads
    if norm is not None:
        residual = norm.residual if norm.residual is not None else x
        if residual.stride(0) != k or norm.residual_out is not None and norm.residual_out.stride(0) != k:
            raise ValueError("the RMSNorm prologue takes contiguous residual rows")
        norm_args = (residual, norm.residual_out if norm.residual_out is not None else x, norm.weight, norm.eps)
    programs = triton.cdiv(weight.shape[0], ROWS)
    slots = min(programs, QUANT_ONCE_SLOTS)
    # the rows quantized once; else a placeholder QUANT_ONCE = 0 never reads (no allocation on the plain path)
    scratch = torch.empty((slots, m, k), dtype=torch.uint8, device=x.device) if quant_once else out
    preload, prefetch = prologue_steps(config, k, single_step, pdl)
    epilogue, head_dim, block_size = rope_epilogue_args(rope, out)
    _gemv_kernel[(programs,)](
        None, xv, weight_scale if quant_x else x_scale, weight.view(torch.uint8), weight_scale, out, m,
        weight.shape[0], k, xv.stride(0), weight.stride(0), out.stride(0), *epilogue, scratch,
        weight.shape[0] // 2 if silu_mul else 0, *norm_args, WARPS=config.warps,
        CHUNKS=config.chunks, W_TILE=w_tile, X_TILE=x_tile, MMA=mma, EVEN_K=k % step == 0,
        QUANT_X=quant_x and not quant_once,
        SINGLE_STEP=single_step, PREFETCH_STEPS=prefetch, PRELOAD=preload,
        FP8_MAX=FP8_MAX, MIN_SCALE=FP8_MIN_SCALE,
        ROPE_CACHE=rope is not None, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, num_warps=config.warps,
        STAGED=config.staged, STAGED_LAYOUT=staged_layout() if config.staged else None, SILU_MUL=silu_mul,
        QUANT_ONCE=quant_once,
        PIECES=triton.cdiv(k, 256 * config.warps), SLOTS=slots,
        NORM=0 if norm is None else 1 if norm.residual is None else 2, **launch_options(pdl),
    )  # fmt: skip


@functools.cache
def staged_layout():
    """The staged steps' shared layout: a step's ``[warp, row, byte]`` tile with each row's 16-byte vectors XOR-swizzled
    by the row, so the eight threads of a 128-bit access phase (four byte offsets 32 apart, two rows) hit 32
    distinct banks."""
    return gl.SwizzledSharedLayout(vec=16, per_phase=1, max_phase=8, order=[2, 1, 0])


def gluon_fp8_gemv_rope_cache(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                              weight_scale: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                              q_rows: int, kv_rows: int, head_dim: int, out_dtype: torch.dtype,
                              config: GemvConfig, norm: RowNorm | None = None) -> torch.Tensor:  # fmt: skip
    """The qkv projection and ``attention_prep`` in one launch: ``xq`` (e4m3, per-token ``x_scale``; or with
    ``norm``, unnormed rows of ``out_dtype`` and ``x_scale`` None) times the ``[q | k | v]`` weight; returns q
    ``[M, q_rows]`` rotated, and writes k (rotated) and v into the paged caches ``[num_blocks, block_size,
    kv_heads, head_dim]`` at ``slot_mapping`` (negative slots skip). ``positions`` index ``cos_sin_cache``
    ``[positions, head_dim]`` (cos | sin, float32). Callers check :func:`gemv_supported` and
    :func:`rope_cache_supported`."""
    q = torch.empty((xq.shape[0], q_rows), dtype=out_dtype, device=xq.device)
    if xq.shape[0]:
        rope = (positions, cos_sin_cache, slot_mapping, k_cache, v_cache, q_rows, kv_rows, head_dim)
        _launch(xq, x_scale, weight, weight_scale, q, config, rope, norm=norm)
    return q


def gluon_fp8_gemv_silu_mul(xq: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor,
                            weight_scale: torch.Tensor, out_dtype: torch.dtype, config: GemvConfig,
                            norm: RowNorm | None = None) -> torch.Tensor:  # fmt: skip
    """``silu_and_mul(xq @ weight^T)`` in one launch: ``weight`` ``[gate | up]`` (``2 d`` rows), ``xq`` e4m3 with its
    per-token ``x_scale`` (or with ``norm``, unnormed rows of ``out_dtype`` and ``x_scale`` None); returns ``[M, d]``
    in ``out_dtype``, rounded as the GEMM's output and then the activation's. Callers check :func:`gemv_supported`
    and :func:`silu_mul_supported`."""
    out = torch.empty((xq.shape[0], weight.shape[0] // 2), dtype=out_dtype, device=xq.device)
    if xq.shape[0]:
        _launch(xq, x_scale, weight, weight_scale, out, config, silu_mul=True, norm=norm)
    return out
