"""Gated MLP activations over a merged gate_up projection, one kernel: ``silu(gate) * up`` (SwiGLU: Llama, Qwen,
Mixtral) and ``gelu(gate) * up`` (GeGLU: Gemma), exact or tanh-approximated. One pass reads ``[gate | up]`` and
writes the product; the unfused torch form reads the gate twice and writes an intermediate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.fp8_linear import Fp8Activations, quantize_activations, quantize_activations_triton
from kernels.fp8_quant import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, e4m3_row_scale, to_e4m3
from kernels.pdl import launch_options, use_pdl, wait_then_release


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``x`` is ``[..., 2 * d]`` = ``[gate | up]``; returns ``[..., d]``."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


# The ACT constexpr of the kernel; GELU_APPROXIMATIONS maps torch's ``approximate`` argument to it.
ACT_SILU, ACT_GELU, ACT_GELU_TANH = 0, 1, 2
GELU_APPROXIMATIONS = {"none": ACT_GELU, "tanh": ACT_GELU_TANH}
_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)  # jit code may only read constexpr globals
_INV_SQRT_2: tl.constexpr = tl.constexpr(0.7071067811865476)


def gelu_and_mul_ref(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``x`` is ``[..., 2 * d]`` = ``[gate | up]``; returns ``gelu(gate) * up``, ``[..., d]``."""
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate=approximate) * x[..., d:]


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_out, BLOCK: tl.constexpr, ACT: tl.constexpr,
                        USE_PDL: tl.constexpr = False):  # fmt: skip
    wait_then_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask).to(tl.float32)
    if ACT == 0:
        act = gate / (1.0 + tl.exp(-gate))
    elif ACT == 1:
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * _INV_SQRT_2))
    else:  # 0.5 * (1 + tanh(z)) == sigmoid(2z)
        z = _SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate)
        act = gate / (1.0 + tl.exp(-2.0 * z))
    tl.store(out_ptr + row * stride_out + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def act_and_mul_triton(x: torch.Tensor, act: int, out: torch.Tensor | None = None) -> torch.Tensor:
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
    pdl = use_pdl(x)
    _act_and_mul_kernel[(rows.shape[0], triton.cdiv(d, block))](
        rows, out_rows, d, rows.stride(0), out_rows.stride(0), BLOCK=block, ACT=act, num_warps=4,
        **launch_options(pdl),
    )
    return out


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, out_ptr, q_ptr, scale_ptr, d, stride_x, stride_out, BLOCK: tl.constexpr,
                             FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                             USE_PDL: tl.constexpr = False):  # fmt: skip
    """One program per row (the whole row in registers, so its absmax is in one program): ``silu(gate) * up``
    rounded to the output dtype, stored, and also quantized per row to e4m3 (``to_e4m3``, like every quantizing
    kernel)."""
    wait_then_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    out = (gate / (1.0 + tl.exp(-gate)) * up).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + offs, out, mask=mask)
    rounded = out.to(tl.float32)
    scale = e4m3_row_scale(tl.max(tl.abs(rounded), axis=0), FP8_MAX, MIN_SCALE)
    q = to_e4m3(rounded, scale, FP8_MAX)
    tl.store(q_ptr + row * d + offs, q.to(tl.uint8, bitcast=True), mask=mask)
    tl.store(scale_ptr + row, scale)


FP8_FUSED_MAX_D = 16384  # rows up to this width fit one program's registers (16 warps: 32 + 32 values a thread)


def silu_and_mul_fp8_triton(x: torch.Tensor) -> Fp8Activations:
    """:func:`silu_and_mul_fp8` in one Triton launch; rows wider than ``FP8_FUSED_MAX_D`` take the two unfused
    kernels (same result)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    d = x.shape[-1] // 2
    if d > FP8_FUSED_MAX_D:
        out = silu_and_mul_triton(x)
        return Fp8Activations(out, *quantize_activations_triton(out))
    out = torch.empty((x.shape[0], d), dtype=x.dtype, device=x.device)
    q = torch.empty((x.shape[0], d), dtype=torch.uint8, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    if x.shape[0]:
        block = triton.next_power_of_2(d)
        _silu_and_mul_fp8_kernel[(x.shape[0],)](x, out, q, scale, d, x.stride(0), out.stride(0), BLOCK=block,
                                                 FP8_MAX=FP8_MAX, MIN_SCALE=FP8_MIN_SCALE,
                                                 num_warps=max(4, min(16, block // 1024)),
                                                 **launch_options(use_pdl(x)))  # fmt: skip
    return Fp8Activations(out, q.view(FP8_DTYPE), scale)


def silu_and_mul_fp8(x: torch.Tensor, *, backend: str = "auto") -> Fp8Activations:
    """``silu_and_mul`` whose output also comes quantized per token to e4m3 (``Fp8Activations``) in the same launch,
    for a W8A8 fp8 down projection (no quantization launch of its own). 2-D ``x``. The quantization equals
    ``quantize_activations`` of the output."""
    if x.dim() != 2:
        raise ValueError(f"silu_and_mul_fp8 takes 2-D rows, got {tuple(x.shape)}")
    if use_triton(x, backend):
        return silu_and_mul_fp8_triton(x)
    out = silu_and_mul_ref(x)
    return Fp8Activations(out, *quantize_activations(out))


def silu_and_mul_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return act_and_mul_triton(x, ACT_SILU, out)


def silu_and_mul(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    if use_triton(x, backend):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)


def gelu_and_mul(x: torch.Tensor, approximate: str = "tanh", *, backend: str = "auto") -> torch.Tensor:
    """GeGLU; ``approximate`` as torch's ``F.gelu`` ("none" or "tanh")."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"gelu approximate must be one of {sorted(GELU_APPROXIMATIONS)}, got {approximate!r}")
    if use_triton(x, backend):
        return act_and_mul_triton(x, GELU_APPROXIMATIONS[approximate])
    return gelu_and_mul_ref(x, approximate)
