"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton


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
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``out = weight * round(norm(x))``; with a residual, ``x + residual`` (rounded) is also stored into it."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
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
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    out = normed * weight[None, :]
    o_ptrs = out_ptr + _row_offsets(rows, inner, stride_o0, stride_o1)[:, None] + cols[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


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
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same function as the reference, in one pass over each row.

    Without ``residual``: returns a new contiguous tensor; ``x`` may be a strided 3-D view (q/k heads of a fused qkv
    output). With ``residual``: IN PLACE - the normed output overwrites ``x`` and ``x + residual`` overwrites
    ``residual``; returns ``(x, residual)``. Callers must use the return values and not hold on to the inputs.
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
    _rms_norm_kernel[(triton.cdiv(num_rows, rows_per_program),)](
        x, res_arg, weight, out, num_rows, n_cols, inner, sx0, sx1, sr0, sr1, so0, so1, eps,
        HAS_RESIDUAL=residual is not None,
        ROWS=rows_per_program,
        BLOCK_N=block_n,
        num_warps=8 if block_n >= 4096 else 4,
    )  # fmt: skip
    return out if residual is None else (out, residual)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See ``rms_norm_triton``: with Triton the residual variant works in place; always use the return values."""
    if use_triton(x, backend):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
