"""SiLU-and-mul: the gated MLP's ``silu(gate) * up`` over a merged gate_up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.backend import use_triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``x`` is ``[..., 2 * d]`` = ``[gate | up]``; returns ``[..., d]``."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Math in float32, one rounding at the end; rows may be strided, the last dim must be contiguous."""
    d = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if out is None:
        out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    out_rows = out.view(-1, d)
    if rows.shape[0] == 0:
        return out
    block = min(1024, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(d, block))](
        rows, out_rows, d, rows.stride(0), out_rows.stride(0), BLOCK=block, num_warps=4
    )
    return out


def silu_and_mul(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    if use_triton(x, backend):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
