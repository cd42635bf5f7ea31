"""RMSNorm with the residual add fused in (one kernel instead of two on the GPU)."""

from __future__ import annotations

import torch
from torch import nn

from kernels.backend import check_backend
from kernels.fp8_linear import Fp8Activations, NormedRows
from kernels.gemv_rows_gluon import RowNorm
from kernels.rmsnorm import rms_norm, rms_norm_fp8


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, *, backend: str = "auto") -> None:
        super().__init__()
        self.backend = check_backend(backend)
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, *, quantize_fp8: bool = False
    ) -> torch.Tensor | Fp8Activations | tuple[torch.Tensor | Fp8Activations, torch.Tensor]:
        """``quantize_fp8``: the output also quantized per token to e4m3 in the same launch (``Fp8Activations``), for
        the W8A8 fp8 layer that reads it next (``Linear.takes_fp8_activations``)."""
        if quantize_fp8:
            out, residual_out = rms_norm_fp8(x, self.weight, self.eps, residual, backend=self.backend)
            return out if residual is None else (out, residual_out)
        return rms_norm(x, self.weight, self.eps, residual, backend=self.backend)

    def pending(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormedRows:
        """This norm of ``x`` (after the residual add) left to the GEMM that reads it (``NormedRows``), with a fresh
        buffer for ``x + residual``: that GEMM's programs still read ``residual`` while one of them writes the sum."""
        residual_out = None if residual is None else torch.empty_like(residual)
        return NormedRows(x, RowNorm(self.weight, self.eps, residual, residual_out))


class LayerNorm(nn.Module):
    """LayerNorm with weight and (optional) bias, computed in float32 as HF's fp32 path computes it."""

    def __init__(self, hidden_size: int, eps: float, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
