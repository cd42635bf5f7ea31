"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.fp8_linear import Fp8Activations, quantize_activations
from kernels.fp8_quant import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, e4m3_row_scale, to_e4m3
from kernels.pdl import launch_options, release_early, use_pdl, wait_then_release

# Release the next PDL kernel (the GEMM this norm feeds) before the wait, not after it: see kernels/pdl.py.
RELEASE_BEFORE_WAIT = True


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x)``, or with ``residual``: ``r = x + residual; (norm(r), r)``. Math in float32, like HF."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        residual = x
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * out.to(x.dtype)
    return out if residual is None else (out, residual)


@triton.jit
def _row_offsets(rows, inner, stride0, stride1):
    """Element offset of each row of a ``[outer, inner, N]`` view (``inner == 1`` for plain 2-D rows)."""
    rows = rows.to(tl.int64)
    return (rows // inner) * stride0 + (rows % inner) * stride1


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    num_rows,
    n_cols,
    inner,
    stride_x0,
    stride_x1,
    stride_r0,
    stride_r1,
    stride_o0,
    stride_o1,
    eps,
    q_ptr,
    scale_ptr,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QUANTIZE: tl.constexpr = False,
    FP8_MAX: tl.constexpr = 448.0,
    MIN_SCALE: tl.constexpr = 0.0,
    USE_PDL: tl.constexpr = False,
    EARLY_RELEASE: tl.constexpr = False,
):
    """``out = weight * round(norm(x))``; with a residual, ``x + residual`` (rounded) is also stored into it. With
    ``QUANTIZE`` also the rounded ``out`` quantized per row to e4m3 (bits into ``q_ptr [rows, n_cols]``, fp32 scales
    into ``scale_ptr``) by ``kernels/fp8_quant.py``'s ``to_e4m3``, so the bits of the separate quantization launch."""
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    # The GEMM this norm feeds launches now and loads its first weight tiles while the GEMM before the norm still
    # runs: after the wait, they would go out with the norm's own loads and delay them.
    release_early(USE_PDL and EARLY_RELEASE)
    # The norm's weight is never written by a kernel: read before the PDL wait, while the kernel before runs (with
    # the next GEMM's weight streaming then, a read after it would queue behind that traffic).
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    wait_then_release(USE_PDL, EARLY_RELEASE)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask = (rows < num_rows)[:, None] & col_mask[None, :]
    x_ptrs = x_ptr + _row_offsets(rows, inner, stride_x0, stride_x1)[:, None] + cols[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r_ptrs = residual_ptr + _row_offsets(rows, inner, stride_r0, stride_r1)[:, None] + cols[None, :]
        summed = (x + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(r_ptrs, summed.to(residual_ptr.dtype.element_ty), mask=mask)
        x = summed.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 1) / n_cols + eps)
    normed = (x * inv_rms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    out = normed * weight[None, :]
    o_ptrs = out_ptr + _row_offsets(rows, inner, stride_o0, stride_o1)[:, None] + cols[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if QUANTIZE:
        rounded = out.to(out_ptr.dtype.element_ty).to(tl.float32)
        scale = e4m3_row_scale(tl.max(tl.abs(rounded), axis=1), FP8_MAX, MIN_SCALE)
        q = to_e4m3(rounded, scale[:, None], FP8_MAX)
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], q.to(tl.uint8, bitcast=True), mask=mask)
        tl.store(scale_ptr + rows, scale, mask=rows < num_rows)


def _as_rows(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(num_rows, inner, stride0, stride1) addressing the rows of a 1-3-D tensor without copying it."""
    if t.dim() == 1:
        return 1, 1, 0, 0
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0
    if t.dim() == 3:
        return t.shape[0] * t.shape[1], t.shape[1], t.stride(0), t.stride(1)
    raise ValueError(f"rms_norm expects 1-3 dims, got {t.dim()}")


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    fp8_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same function as the reference, in one pass over each row.

    Without ``residual``: returns a new contiguous tensor; ``x`` may be a strided 3-D view (q/k heads of a fused qkv
    output). With ``residual``: IN PLACE - the normed output overwrites ``x`` and ``x + residual`` overwrites
    ``residual``; returns ``(x, residual)``. Callers must use the return values and not hold on to the inputs.
    ``fp8_out`` (uint8 ``[rows, n]``, fp32 ``[rows, 1]``): also write the output's per-row e4m3 quantization there.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_cols = x.shape[-1]
    if residual is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        res_arg = x
    else:
        if residual.shape != x.shape or residual.stride(-1) != 1:
            raise ValueError("residual must have x's shape and a unit last stride")
        out = x
        res_arg = residual
    num_rows, inner, sx0, sx1 = _as_rows(x)
    _, _, sr0, sr1 = _as_rows(res_arg)
    _, _, so0, so1 = _as_rows(out)
    if num_rows == 0:
        return out if residual is None else (out, residual)
    block_n = triton.next_power_of_2(n_cols)
    rows_per_program = max(1, min(16, 2048 // block_n))
    q, scale = fp8_out if fp8_out is not None else (out, out)
    quantize = {} if fp8_out is None else {"QUANTIZE": True, "FP8_MAX": FP8_MAX, "MIN_SCALE": FP8_MIN_SCALE}
    _rms_norm_kernel[(triton.cdiv(num_rows, rows_per_program),)](
        x, res_arg, weight, out, num_rows, n_cols, inner, sx0, sx1, sr0, sr1, so0, so1, eps, q, scale,
        HAS_RESIDUAL=residual is not None,
        ROWS=rows_per_program,
        BLOCK_N=block_n,
        num_warps=8 if block_n >= 4096 else 4,
        EARLY_RELEASE=RELEASE_BEFORE_WAIT,
        **quantize,
        **launch_options(use_pdl(x)),
    )  # fmt: skip
    return out if residual is None else (out, residual)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See ``rms_norm_triton``: with Triton the residual variant works in place; always use the return values."""
    if use_triton(x, backend):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


def rms_norm_fp8_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[Fp8Activations, torch.Tensor | None]:
    """:func:`rms_norm_fp8` in one Triton launch (in place with a residual, as ``rms_norm_triton``)."""
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    result = rms_norm_triton(x, weight, eps, residual, fp8_out=(q, scale))
    out, residual = result if residual is not None else (result, None)
    return Fp8Activations(out, q.view(FP8_DTYPE), scale), residual


def rms_norm_fp8(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *, backend: str = "auto"
) -> tuple[Fp8Activations, torch.Tensor | None]:
    """``rms_norm`` whose output also comes quantized per token to e4m3 (``Fp8Activations``) in the same launch, for
    a W8A8 fp8 GEMM that reads it next (no quantization launch of its own); ``(activations, residual)``, the
    residual None without one. 2-D ``x``. The quantization equals ``quantize_activations`` of the output."""
    if x.dim() != 2:
        raise ValueError(f"rms_norm_fp8 takes 2-D rows, got {tuple(x.shape)}")
    if use_triton(x, backend):
        return rms_norm_fp8_triton(x, weight, eps, residual)
    result = rms_norm_ref(x, weight, eps, residual)
    out, residual = result if residual is not None else (result, None)
    return Fp8Activations(out, *quantize_activations(out)), residual
