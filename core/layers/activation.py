"""Activations the non-Llama families use (torch ops: a GELU is one fused elementwise kernel already)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# HF ``hidden_act`` / ``hidden_activation`` names -> function
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported activation '{name}'; supported: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def gated(x: torch.Tensor, act) -> torch.Tensor:
    """``act(gate) * up`` on a merged ``[..., 2 * I]`` gate/up output (GeGLU when ``act`` is a GELU)."""
    gate, up = x.chunk(2, dim=-1)
    return act(gate).mul_(up)  # into the activation's fresh output: one [..., I] tensor, not two
