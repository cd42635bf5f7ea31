"""The second half of a W8A8 fp8 decoder layer's decode step in one launch: o_proj, the post-attention add-RMSNorm,
gate_up with SiLU-and-mul and down, as tasks of one grid (``kernels/task_order.py``).

Why: as a chain of kernels these are three boundaries a layer (o_proj -> norm, norm -> gate_up, gate_up -> down;
the norm is a kernel of its own), each the producer grid's completion, the consumer's PDL wait and a memory trip,
and the step is its weight bytes plus ~14 us a layer that does not shrink with bandwidth (``kernels/NOTES.md``).
Here a task's inputs are ready when a counter says so:

- tickets ``[0, O)``: o_proj's GEMV programs (``kernels/fp8_gemv_gluon.py: _gemv_kernel``, the attention output
  quantized once per program), after the PDL wait on attention. The last of them to arrive norms the row sum
  ``o + residual`` and quantizes it per token (``_norm_rows_once``: ``kernels/rmsnorm.py``'s roundings) for all of
  gate_up's programs, and stores the sum, the next layer's residual;
- tickets ``[O, O + G)``: gate_up's programs with the SiLU-and-mul epilogue; each loads its first steps of weight
  into registers, then waits for the norm;
- the rest: down's programs (rows quantized once per program), after every gate_up program. The last of them
  resets the counters.

Each task's program body and numerics are the standalone GEMV's, so the launch gives the bits of
``gluon_fp8_gemv`` (o_proj quantizing once) -> ``gluon_fp8_gemv_silu_mul`` with the norm prologue -> ``gluon_fp8_gemv``
(down quantizing once) run at the same configs (GPU test). Gluon has no interpreter: the CPU path is the model's
kernel-per-op chain.

Measured slower (RESULTS.md and ``kernels/NOTES.md``, thirty-second session): W3-fp8 8% under the kernel chain on
the H100, 5% under it even with gate_up not waiting for the norm at all. So :data:`MLP_HALF_CONFIGS` has no entry
and the launch is off; ``benchmarks/fp8_gemv_variants.py`` (``mlp-half``) runs it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language  # noqa: F401 - constexpr counters

from kernels.fp8_gemv_gluon import (
    HAS_GLUON,
    QUANT_ONCE_SLOTS,
    ROWS,
    GemvConfig,
    gemv_layouts,
    gemv_supported,
    prologue_steps,
    staged_layout,
)
from kernels.fp8_quant import FP8_MAX, FP8_MIN_SCALE
from kernels.pdl import launch_options, use_pdl
from kernels.task_order import task_counters

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from kernels.fp8_gemv_gluon import _gemv_kernel
    from kernels.gemv_rows_gluon import _cta_barrier, _norm_rows_once
    from kernels.task_order import arrive, arrive_quietly, take_ticket


class MlpHalfConfig(NamedTuple):
    """The three GEMVs' configs (one ``warps`` for all: one launch); ``quantize_once`` is implied where the rows
    come unquantized (o_proj's and down's)."""

    o: GemvConfig = GemvConfig(8, 2)
    gate_up: GemvConfig = GemvConfig(8, 1)
    down: GemvConfig = GemvConfig(8, 2, staged=1)


# (hidden, q_size, intermediate) -> the config, or None where the kernel chain runs (unmeasured shapes: off)
MLP_HALF_CONFIGS: dict[tuple[int, int, int], MlpHalfConfig | None] = {}
MLP_HALF_ENABLED = True
# Tasks by ticket (an atomic per program, before its first load: deadlock-free whatever order programs start in) or
# by program id (the order NVIDIA GPUs start a grid's programs in, which CUTLASS's stream-K fix-up also relies on)
TICKETS = True
# the counters this launch uses (kernels/task_order.py: task_counters)
_TICKET, _O_DONE, _NORMED, _GATE_UP_DONE, _DOWN_DONE = (triton.language.constexpr(i) for i in range(5))


def mlp_half_configured() -> bool:
    """Whether any shape runs the launch (cheap: a decoder layer asks every step)."""
    return MLP_HALF_ENABLED and bool(MLP_HALF_CONFIGS)


def mlp_half_config(hidden: int, q_size: int, intermediate: int) -> MlpHalfConfig | None:
    """The shape's entry of :data:`MLP_HALF_CONFIGS`, or None where the launch is off for it."""
    return MLP_HALF_CONFIGS.get((hidden, q_size, intermediate)) if MLP_HALF_ENABLED else None


def mlp_half_supported(attn: torch.Tensor, o_weight: torch.Tensor, gate_up_weight: torch.Tensor,
                       down_weight: torch.Tensor) -> bool:  # fmt: skip
    """Whether :func:`gluon_fp8_mlp_half` serves these shapes: each GEMV served by the Gluon kernel, a
    ``[gate | up]`` weight of whole 8-row groups, contiguous bf16 / fp16 rows and weights (the launch takes each
    row stride as its K)."""
    hidden, inter = o_weight.shape[0], down_weight.shape[1]
    weights = (o_weight, gate_up_weight, down_weight)
    return (attn.dtype in (torch.bfloat16, torch.float16) and attn.is_contiguous()
            and all(w.is_contiguous() for w in weights)
            and o_weight.shape[1] == attn.shape[1] and gate_up_weight.shape == (2 * inter, hidden)
            and down_weight.shape[0] == hidden
            and gate_up_weight.shape[0] % 16 == 0 and hidden % 16 == 0 and inter % 16 == 0
            and all(gemv_supported(attn, w) for w in weights))  # fmt: skip


if HAS_GLUON:

    @gluon.jit
    def _mlp_half_kernel(a_ptr, o_w_ptr, o_s_ptr, o_out_ptr, o_scratch_ptr, res_ptr, res_out_ptr, nw_ptr, eps, xq_ptr,
                         xs_ptr, g_w_ptr, g_s_ptr, h_ptr, d_w_ptr, d_s_ptr, d_scratch_ptr, out_ptr, sync_ptr, M,
                         HIDDEN, Q_SIZE, INTER, O_TASKS, G_TASKS, D_TASKS, WARPS: gl.constexpr,
                         O_CHUNKS: gl.constexpr, O_W_TILE: gl.constexpr, O_X_TILE: gl.constexpr,
                         O_MMA: gl.constexpr, O_EVEN_K: gl.constexpr, O_PRELOAD: gl.constexpr,
                         O_PREFETCH: gl.constexpr, O_STAGED: gl.constexpr, O_PIECES: gl.constexpr,
                         G_CHUNKS: gl.constexpr, G_W_TILE: gl.constexpr, G_X_TILE: gl.constexpr,
                         G_MMA: gl.constexpr, G_EVEN_K: gl.constexpr, G_PRELOAD: gl.constexpr,
                         G_PREFETCH: gl.constexpr, G_STAGED: gl.constexpr,
                         D_CHUNKS: gl.constexpr, D_W_TILE: gl.constexpr, D_X_TILE: gl.constexpr,
                         D_MMA: gl.constexpr, D_EVEN_K: gl.constexpr, D_PRELOAD: gl.constexpr,
                         D_PREFETCH: gl.constexpr, D_STAGED: gl.constexpr, D_PIECES: gl.constexpr,
                         N_PIECES: gl.constexpr, STAGED_LAYOUT: gl.constexpr, SLOTS: gl.constexpr,
                         FP8_MAX: gl.constexpr, MIN_SCALE: gl.constexpr, USE_PDL: gl.constexpr,
                         TICKETS: gl.constexpr):  # fmt: skip
        """Tickets as the module says. ``a_ptr``: attention's output ``[M, Q_SIZE]``; ``o_out_ptr``: o_proj's
        ``[M, HIDDEN]``; ``xq_ptr`` / ``xs_ptr``: the normed rows' e4m3 bits and per-token scales; ``h_ptr``:
        SiLU-and-mul's ``[M, INTER]``; ``out_ptr``: down's ``[M, HIDDEN]``; ``res_out_ptr``: ``o + residual``."""
        if TICKETS:
            ticket = take_ticket(sync_ptr + _TICKET)
        else:  # the hardware starts a grid's programs in order (see TICKETS)
            ticket = gl.program_id(0)
        if ticket < O_TASKS:
            _gemv_kernel(ticket, a_ptr, o_s_ptr, o_w_ptr, o_s_ptr, o_out_ptr, M, HIDDEN, Q_SIZE, Q_SIZE, Q_SIZE,
                          HIDDEN, a_ptr, o_s_ptr, 0, a_ptr, a_ptr, a_ptr, 0, 0, 0, 0, 0, 0, 0, 0, o_scratch_ptr, 0,
                          res_ptr, res_out_ptr, nw_ptr, eps, WARPS, O_CHUNKS, O_W_TILE, O_X_TILE, O_MMA, O_EVEN_K,
                          False, False, O_PREFETCH, O_PRELOAD, FP8_MAX, MIN_SCALE, False, 16, 16, USE_PDL, O_STAGED,
                          STAGED_LAYOUT, False, True, O_PIECES, SLOTS, 0)  # fmt: skip
            if arrive(sync_ptr + _O_DONE) == O_TASKS - 1:  # the last o_proj program: the norm for all of gate_up
                _cta_barrier()
                tokens = gl.arange(0, 8, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
                t_scale = _norm_rows_once(o_out_ptr, HIDDEN, res_ptr, res_out_ptr, nw_ptr, eps, xq_ptr, M, HIDDEN, 0,
                                          tokens, WARPS, N_PIECES, True, FP8_MAX, MIN_SCALE)  # fmt: skip
                gl.store(xs_ptr + tokens, t_scale, mask=tokens < M)
                arrive(sync_ptr + _NORMED)
        elif ticket < O_TASKS + G_TASKS:
            _gemv_kernel(ticket - O_TASKS, xq_ptr, xs_ptr, g_w_ptr, g_s_ptr, h_ptr, M, 2 * INTER, HIDDEN, HIDDEN,
                          HIDDEN, INTER, a_ptr, o_s_ptr, 0, a_ptr, a_ptr, a_ptr, 0, 0, 0, 0, 0, 0, 0, 0, xq_ptr, INTER,
                          res_ptr, res_out_ptr, nw_ptr, eps, WARPS, G_CHUNKS, G_W_TILE, G_X_TILE, G_MMA, G_EVEN_K,
                          False, False, G_PREFETCH, G_PRELOAD, FP8_MAX, MIN_SCALE, False, 16, 16, USE_PDL, G_STAGED,
                          STAGED_LAYOUT, True, False, 1, SLOTS, 0, sync_ptr + _NORMED, 1, True)  # fmt: skip
            arrive_quietly(sync_ptr + _GATE_UP_DONE)
        else:
            _gemv_kernel(ticket - O_TASKS - G_TASKS, h_ptr, d_s_ptr, d_w_ptr, d_s_ptr, out_ptr, M, HIDDEN, INTER,
                          INTER, INTER, HIDDEN, a_ptr, o_s_ptr, 0, a_ptr, a_ptr, a_ptr, 0, 0, 0, 0, 0, 0, 0, 0,
                          d_scratch_ptr, 0, res_ptr, res_out_ptr, nw_ptr, eps, WARPS, D_CHUNKS, D_W_TILE, D_X_TILE,
                          D_MMA, D_EVEN_K, False, False, D_PREFETCH, D_PRELOAD, FP8_MAX, MIN_SCALE, False, 16, 16,
                          USE_PDL, D_STAGED, STAGED_LAYOUT, False, True, D_PIECES, SLOTS, 0,
                          sync_ptr + _GATE_UP_DONE, G_TASKS, True)  # fmt: skip
            if arrive(sync_ptr + _DOWN_DONE) == D_TASKS - 1:  # every task has run: counters zero for the next launch
                offs = gl.arange(0, 8, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
                gl.store(sync_ptr + offs, gl.zeros([8], gl.int32, gl.BlockedLayout([1], [32], [WARPS], [0])))


def launch_constexprs(config: MlpHalfConfig, hidden: int, q_size: int, inter: int, pdl: bool) -> dict:
    """The launch's constexprs but ``USE_PDL`` (``kernels/pdl.py: launch_options`` gives it): each task's layouts
    and prologue (``prologue_steps``; gate_up's and down's counter waits are waits to load before, PDL or not),
    the quantize-once pieces and scratch slots. ``benchmarks/gluon_gemv_sass.py`` compiles with the same."""
    warps = config.o.warps
    if config.gate_up.warps != warps or config.down.warps != warps:
        raise ValueError(f"one launch runs one warp count: {config}")
    constexprs = {"WARPS": warps, "O_PIECES": triton.cdiv(q_size, 256 * warps),
                  "D_PIECES": triton.cdiv(inter, 256 * warps), "N_PIECES": triton.cdiv(hidden, 256 * warps),
                  "SLOTS": min(triton.cdiv(hidden, ROWS), QUANT_ONCE_SLOTS), "FP8_MAX": FP8_MAX,
                  "MIN_SCALE": FP8_MIN_SCALE, "TICKETS": TICKETS,
                  "STAGED_LAYOUT": staged_layout() if any(c.staged for c in config) else None}
    for prefix, task, k, waits_before in (("O", config.o, q_size, pdl), ("G", config.gate_up, hidden, True),
                                          ("D", config.down, inter, True)):
        w_tile, x_tile, mma = gemv_layouts(task.warps, task.chunks)
        preload, prefetch = prologue_steps(task, k, False, waits_before)
        values = (task.chunks, w_tile, x_tile, mma, k % task.step == 0, preload, prefetch, task.staged)
        for name, value in zip(("CHUNKS", "W_TILE", "X_TILE", "MMA", "EVEN_K", "PRELOAD", "PREFETCH", "STAGED"),
                               values):
            constexprs[f"{prefix}_{name}"] = value
    return constexprs


def gluon_fp8_mlp_half(attn: torch.Tensor, residual: torch.Tensor, o_weight: torch.Tensor, o_scale: torch.Tensor,
                       norm_weight: torch.Tensor, eps: float, gate_up_weight: torch.Tensor, gate_up_scale: torch.Tensor,
                       down_weight: torch.Tensor, down_scale: torch.Tensor, config: MlpHalfConfig
                       ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``down(silu_and_mul(gate_up(rms_norm(o_proj(attn) + residual))))`` and ``o_proj(attn) + residual`` (the next
    residual), W8A8 with per-token dynamic activation scales, in one launch. Callers check
    :func:`mlp_half_supported`."""
    m, q_size = attn.shape
    hidden, inter = o_weight.shape[0], down_weight.shape[1]
    pdl = use_pdl(attn)
    constexprs = launch_constexprs(config, hidden, q_size, inter, pdl)
    dtype = attn.dtype
    dev = attn.device
    o_out = torch.empty((m, hidden), dtype=dtype, device=dev)
    res_out = torch.empty((m, hidden), dtype=dtype, device=dev)
    h = torch.empty((m, inter), dtype=dtype, device=dev)
    out = torch.empty((m, hidden), dtype=dtype, device=dev)
    xq = torch.empty((m, hidden), dtype=torch.uint8, device=dev)
    xs = torch.empty((m,), dtype=torch.float32, device=dev)
    o_scratch = torch.empty((constexprs["SLOTS"], m, q_size), dtype=torch.uint8, device=dev)
    d_scratch = torch.empty((constexprs["SLOTS"], m, inter), dtype=torch.uint8, device=dev)
    tasks = [triton.cdiv(n, ROWS) for n in (hidden, 2 * inter, hidden)]
    _mlp_half_kernel[(sum(tasks),)](
        attn, o_weight.view(torch.uint8), o_scale, o_out, o_scratch, residual, res_out, norm_weight, eps, xq, xs,
        gate_up_weight.view(torch.uint8), gate_up_scale, h, down_weight.view(torch.uint8), down_scale, d_scratch, out,
        task_counters(dev), m, hidden, q_size, inter, *tasks, **constexprs, num_warps=config.o.warps,
        **launch_options(pdl),
    )  # fmt: skip
    return out, res_out
