"""What the Gluon decode GEMVs (``kernels/fp8_gemv_gluon.py``, ``kernels/int4_gemv_gluon.py``) do to their rows
around the K loop: which weight rows a program owns (rotary pairs for the qkv epilogue, gate / up pairs for the
SiLU-and-mul one), the epilogues themselves (the attention prep, SiLU-and-mul), and the prologues that make the
fp8 GEMV's e4m3 rows from unquantized ones once per program (quantized per token; RMS-normed first).

The ``[16 rows, 8 tokens]`` tiles here are the mma v2 accumulator's: rows ``g`` and ``g + 8`` of a thread are
register neighbours, so an epilogue that pairs them moves no data. Gluon has no interpreter: the GPU tests of the
GEMVs cover these, and ``tests/benchmarks/test_gluon_gemv_sass.py`` compiles them offline.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier  # Triton 3.6: thread_barrier
    HAS_GLUON = True
except ImportError:  # pragma: no cover - a Triton without Gluon
    HAS_GLUON = False


if HAS_GLUON:

    @gluon.jit
    def _e4m3_bits(xv, inv_scale_k):
        """``xv * (1 / scale)`` clamped and rounded to e4m3 (``kernels/fp8_quant.py: to_e4m3``), as its bits. The
        clamp is the conversion's own: the GPU's fp32 -> e4m3 ``cvt`` saturates (``.satfinite``), so finite values
        get ``to_e4m3``'s bits without two ``FMNMX`` per value (64 of a step's ~320 instructions)."""
        return (xv * inv_scale_k).to(gl.float8e4nv).to(gl.uint8, bitcast=True)

    @gluon.jit
    def _program_rows(pid, local, PAIRED_ROWS, HEAD_DIM: gl.constexpr):
        """The weight rows (= output columns) of program ``pid``'s 16 mma rows ``local``: ``16 pid + local``, except
        in the first ``PAIRED_ROWS`` (q and k of a qkv GEMM with the rotary epilogue), where rows ``local`` and
        ``local + 8`` are a rotary pair of one head, dims ``i`` and ``i + HEAD_DIM / 2``: the epilogue finds both
        in the same thread's registers."""
        base = pid * 16
        paired = base - base % HEAD_DIM + (base % HEAD_DIM) // 2 + local % 8 + (local // 8) * (HEAD_DIM // 2)
        return gl.where(base < PAIRED_ROWS, paired, base + local)

    @gluon.jit
    def _rows_of(pid, local, PAIRED_ROWS, GATED_D, HEAD_DIM: gl.constexpr, SILU_MUL: gl.constexpr):
        """:func:`_program_rows`, or (``SILU_MUL``: a ``[gate | up]`` weight of ``2 GATED_D`` rows) gate rows
        ``8 pid + local`` and, at ``local + 8``, the up rows of the same columns: the SiLU-and-mul epilogue finds
        each pair in one thread's registers."""
        if SILU_MUL:
            return pid * 8 + local % 8 + (local // 8) * GATED_D
        else:
            return _program_rows(pid, local, PAIRED_ROWS, HEAD_DIM)

    @gluon.jit
    def _halves(t):
        """A ``[16, 8]`` epilogue tile's rows 0-7 and 8-15 (register neighbours in the mma layout: no data moves)."""
        return gl.split(gl.permute(gl.reshape(t, [2, 8, 8]), [1, 2, 0]))

    @gluon.jit
    def _first_half(t):
        first, second = _halves(t)
        return first

    @gluon.jit
    def _rope_inputs(rows, tokens, M, positions_ptr, cos_sin_ptr, stride_cs, slot_ptr, HEAD_DIM: gl.constexpr):
        """What the rotary epilogue reads besides the product: each token's cache slot (``[16, 8]``, the epilogue's
        layout) and the cos / sin of each (dim pair, token) (``[8, 8]``). Loaded before the K loop, so the
        dependent position -> cos / sin loads are not the program's tail. They are step inputs, written before the
        forward's first kernel: complete before the kernel this one waits on started."""
        HALF: gl.constexpr = HEAD_DIM // 2
        token = gl.minimum(tokens[None, :] + rows[:, None] * 0, M - 1)
        slot = gl.load(slot_ptr + token).to(gl.int64)
        pos = gl.load(positions_ptr + _first_half(token)).to(gl.int64)
        freq = _first_half(rows[:, None] + tokens[None, :] * 0) % HEAD_DIM
        cos = gl.load(cos_sin_ptr + pos * stride_cs + freq)
        sin = gl.load(cos_sin_ptr + pos * stride_cs + HALF + freq)
        return slot, cos, sin

    @gluon.jit
    def _rope_cache_epilogue(y, rows, tokens, pid, M, q_ptr, stride_qm, slot, cos, sin, k_cache_ptr, v_cache_ptr,
                             stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, Q_ROWS,
                             KV_ROWS, HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr):  # fmt: skip
        """``attention_prep`` in the qkv GEMM's epilogue (no q/k norm, full rotary, a cache of the output dtype):
        q rotated into ``q_ptr``, k rotated and v into the paged cache; the same roundings as the qkv output
        followed by the prep kernel (``kernels/attention_prep.py``). ``y``: ``[16 rows, 8 tokens]``; ``slot``,
        ``cos``, ``sin``: :func:`_rope_inputs`."""
        HALF: gl.constexpr = HEAD_DIM // 2
        base = pid * 16
        y = y.to(q_ptr.dtype.element_ty).to(gl.float32)  # the qkv output's rounding
        row_grid = rows[:, None] + tokens[None, :] * 0
        token_grid = tokens[None, :] + rows[:, None] * 0
        if base < Q_ROWS + KV_ROWS:  # q or k: rotate each (dim, dim + HALF) pair
            x1, x2 = _halves(y)
            dim1 = _first_half(row_grid)  # the pair's first dim, as a qkv column
            tok1 = _first_half(token_grid)
            live1 = tok1 < M
            r1 = x1 * cos - x2 * sin
            r2 = x2 * cos + x1 * sin
            if base < Q_ROWS:
                q_dst = q_ptr + tok1.to(gl.int64) * stride_qm + dim1
                gl.store(q_dst, r1.to(q_ptr.dtype.element_ty), mask=live1)
                gl.store(q_dst + HALF, r2.to(q_ptr.dtype.element_ty), mask=live1)
            else:
                slot1 = _first_half(slot)
                head = (dim1 - Q_ROWS) // HEAD_DIM
                k_dst = (k_cache_ptr + (slot1 // BLOCK_SIZE) * stride_kcb + (slot1 % BLOCK_SIZE) * stride_kcs
                         + head * stride_kch + dim1 % HEAD_DIM)  # fmt: skip
                keep = live1 & (slot1 >= 0)
                gl.store(k_dst, r1.to(q_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty), mask=keep)
                gl.store(k_dst + HALF, r2.to(q_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty), mask=keep)
        else:  # v: into the cache as it is
            col = row_grid - Q_ROWS - KV_ROWS
            v_dst = (v_cache_ptr + (slot // BLOCK_SIZE) * stride_vcb + (slot % BLOCK_SIZE) * stride_vcs
                     + (col // HEAD_DIM) * stride_vch + col % HEAD_DIM)  # fmt: skip
            gl.store(v_dst, y.to(v_cache_ptr.dtype.element_ty), mask=(token_grid < M) & (slot >= 0))

    @gluon.jit
    def _silu_mul_epilogue(y, rows, tokens, M, out_ptr, stride_om):
        """``silu(gate) * up`` of the program's 8 gate columns (rows 0-7 of ``y`` ``[16 rows, 8 tokens]``) and their
        up rows (8-15) into ``out`` ``[M, GATED_D]``: the gate_up output's rounding, then ``silu_and_mul``'s
        formula and rounding (``kernels/activation.py``)."""
        gate, up = _halves(y.to(out_ptr.dtype.element_ty).to(gl.float32))
        col = _first_half(rows[:, None] + tokens[None, :] * 0)
        tok = _first_half(tokens[None, :] + rows[:, None] * 0)
        h = gate / (1.0 + gl.exp(-gate)) * up
        gl.store(out_ptr + tok * stride_om + col, h.to(out_ptr.dtype.element_ty), mask=tok < M)

    @gluon.jit
    def _quantize_rows_once(x_ptr, stride_xm, q_ptr, M, K, tokens, WARPS: gl.constexpr, PIECES: gl.constexpr,
                            FP8_MAX: gl.constexpr, MIN_SCALE: gl.constexpr):  # fmt: skip
        """x's ``M`` rows (bf16 / fp16) quantized per token to e4m3 by the whole program, 16 bytes per thread per
        piece (a pass for the absmax, in x's dtype: exact, and a second one that hits L1) into ``q_ptr`` ``[M, K]``,
        which the K loop then reads as it reads rows quantized upstream; returns the scales in ``tokens``' layout.
        Every program writes the same bytes (the same loads and ops), so programs may share a scratch row. The
        barrier makes this program's stores visible to all its threads."""
        layout: gl.constexpr = gl.BlockedLayout([8], [32], [WARPS], [0])
        PIECE: gl.constexpr = 8 * 32 * WARPS
        offs = gl.arange(0, PIECE, layout=layout)
        t_scale = tokens.to(gl.float32) * 0.0
        for m in range(M):
            row = x_ptr + m * stride_xm
            amax = gl.abs(gl.load(row + offs, mask=offs < K, other=0.0))
            for p in gl.static_range(1, PIECES):
                amax = gl.maximum(amax, gl.abs(gl.load(row + p * PIECE + offs, mask=p * PIECE + offs < K, other=0.0)))
            scale = gl.maximum(gl.max(amax, axis=0).to(gl.float32) / FP8_MAX, MIN_SCALE)
            inv_scale = 1.0 / scale
            for p in gl.static_range(PIECES):
                live = p * PIECE + offs < K
                v = gl.load(row + p * PIECE + offs, mask=live, other=0.0).to(gl.float32)
                gl.store(q_ptr + m * K + p * PIECE + offs, _e4m3_bits(v, inv_scale), mask=live)
            t_scale = gl.where(tokens == m, scale, t_scale)
        _cta_barrier()
        return t_scale

    @gluon.jit
    def _summed_row(x_row, res_row, offs, live, ADD: gl.constexpr):
        """A piece of ``x + residual`` rounded to x's dtype (the fused add-RMSNorm's residual), as fp32."""
        x = gl.load(x_row + offs, mask=live, other=0.0)
        if ADD:
            x = (x.to(gl.float32) + gl.load(res_row + offs, mask=live, other=0.0).to(gl.float32)).to(x.dtype)
        return x.to(gl.float32)

    @gluon.jit
    def _normed_piece(h, inv_rms, nw_ptr, offs, live, dtype: gl.constexpr):
        """``kernels/rmsnorm.py``'s output of a piece: ``weight * round(h * inv_rms)``, rounded, as fp32."""
        normed = (h * inv_rms).to(dtype).to(gl.float32)
        return (normed * gl.load(nw_ptr + offs, mask=live, other=0.0).to(gl.float32)).to(dtype).to(gl.float32)

    @gluon.jit
    def _norm_rows_once(x_ptr, stride_xm, res_ptr, res_out_ptr, nw_ptr, eps, q_ptr, M, K, pid, tokens,
                        WARPS: gl.constexpr, PIECES: gl.constexpr, ADD: gl.constexpr, FP8_MAX: gl.constexpr,
                        MIN_SCALE: gl.constexpr):  # fmt: skip
        """:func:`_quantize_rows_once` of ``rms_norm(x (+ residual)) * weight`` (``kernels/rmsnorm.py``'s kernel and
        roundings; only the sum of squares is added in another order): every program norms and quantizes the whole
        rows itself, and program 0 also stores ``x + residual`` (``ADD``) into ``res_out_ptr``. Three passes over
        each row (sum of squares, absmax, quantization), the second and third from L1."""
        layout: gl.constexpr = gl.BlockedLayout([8], [32], [WARPS], [0])
        PIECE: gl.constexpr = 8 * 32 * WARPS
        dtype: gl.constexpr = x_ptr.dtype.element_ty
        offs = gl.arange(0, PIECE, layout=layout)
        t_scale = tokens.to(gl.float32) * 0.0
        for m in range(M):
            x_row = x_ptr + m * stride_xm
            res_row = res_ptr + m * K
            squares = gl.zeros([PIECE], gl.float32, layout=layout)
            for p in range(PIECES):
                live = p * PIECE + offs < K
                h = _summed_row(x_row, res_row, p * PIECE + offs, live, ADD)
                if ADD:
                    gl.store(res_out_ptr + m * K + p * PIECE + offs, h.to(dtype), mask=live & (pid == 0))
                squares += h * h
            inv_rms = gl.rsqrt(gl.sum(squares, axis=0) / K + eps)
            amax = gl.zeros([PIECE], gl.float32, layout=layout)
            for p in range(PIECES):
                live = p * PIECE + offs < K
                h = _summed_row(x_row, res_row, p * PIECE + offs, live, ADD)
                amax = gl.maximum(amax, gl.abs(_normed_piece(h, inv_rms, nw_ptr, p * PIECE + offs, live, dtype)))
            scale = gl.maximum(gl.max(amax, axis=0) / FP8_MAX, MIN_SCALE)
            inv_scale = 1.0 / scale
            for p in range(PIECES):
                live = p * PIECE + offs < K
                h = _summed_row(x_row, res_row, p * PIECE + offs, live, ADD)
                out = _normed_piece(h, inv_rms, nw_ptr, p * PIECE + offs, live, dtype)
                gl.store(q_ptr + m * K + p * PIECE + offs, _e4m3_bits(out, inv_scale), mask=live)
            t_scale = gl.where(tokens == m, scale, t_scale)
        _cta_barrier()
        return t_scale


class RowNorm(NamedTuple):
    """An RMSNorm the GEMV applies to its rows before quantizing them once (``kernels/rmsnorm.py``'s fused
    add-RMSNorm): ``weight`` ``[K]``, ``eps``; with ``residual`` the rows are ``x + residual``, which program 0
    stores into ``residual_out`` (a tensor other than ``residual``: the other programs still read it)."""

    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None = None
    residual_out: torch.Tensor | None = None


def rope_epilogue_args(rope: tuple | None, out: torch.Tensor) -> tuple[tuple, int, int]:
    """The rotary epilogue's kernel arguments (``positions_ptr`` .. ``KV_ROWS``), ``HEAD_DIM`` and ``BLOCK_SIZE``
    from ``rope`` = ``(positions, cos_sin, slot_mapping, k_cache, v_cache, q_rows, kv_rows, head_dim)``, or
    placeholders a plain store never reads (``rope`` None). Shared by the fp8 and int4 GEMVs."""
    if rope is None:
        return (out, out, 0, out, out, out, 0, 0, 0, 0, 0, 0, 0, 0), 16, 16
    positions, cos_sin, slots, k_cache, v_cache, q_rows, kv_rows, head_dim = rope
    return ((positions, cos_sin, cos_sin.stride(0), slots, k_cache, v_cache, *k_cache.stride()[:3],
             *v_cache.stride()[:3], q_rows, kv_rows), head_dim, k_cache.shape[1])  # fmt: skip


def rope_cache_supported(head_dim: int, rotary_dim: int, q_rows: int, kv_rows: int, dtype: torch.dtype,
                         cache_dtype: torch.dtype) -> bool:
    """Whether :func:`gluon_fp8_gemv_rope_cache` serves a qkv projection of this shape: a head dim the 16-row
    programs tile in rotary pairs, rotated whole (no partial rotary), a cache of the model's dtype (an fp8 cache
    keeps the prep kernel and its scales)."""
    return (head_dim % 16 == 0 and rotary_dim == head_dim and q_rows % head_dim == 0 and kv_rows % head_dim == 0
            and cache_dtype == dtype and dtype in (torch.bfloat16, torch.float16))  # fmt: skip


def silu_mul_supported(weight: torch.Tensor) -> bool:
    """Whether :func:`gluon_fp8_gemv_silu_mul` serves a ``[gate | up]`` weight: whole 8-row groups of each half."""
    return weight.shape[0] % 16 == 0
