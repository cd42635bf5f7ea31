"""SiLU-and-mul: the gated MLP's ``silu(gate) * up`` over a merged gate_up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``x`` is ``[..., 2 * d]`` = ``[gate | up]``; returns ``[..., d]``."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_ref(x)
