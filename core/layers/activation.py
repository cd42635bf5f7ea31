"""Activations the non-Llama families use: torch ops (a GELU is one fused elementwise kernel already), and the gated
form through the fused act-and-mul kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.activation import gelu_and_mul, silu_and_mul

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


# Activations with a fused act-and-mul kernel (kernels/activation.py): name -> gelu ``approximate``, or None for SiLU
_FUSED_GATED = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "silu": None}


def gated(x: torch.Tensor, name: str, backend: str = "auto") -> torch.Tensor:
    """``act(gate) * up`` on a merged ``[..., 2 * I]`` gate/up output (GeGLU when the activation is a GELU): one
    fused kernel where kernels/activation.py has one, else the torch activation then an in-place multiply."""
    if name in _FUSED_GATED:
        approximate = _FUSED_GATED[name]
        if approximate is None:
            return silu_and_mul(x, backend=backend)
        return gelu_and_mul(x, approximate, backend=backend)
    gate, up = x.chunk(2, dim=-1)
    return activation(name)(gate).mul_(up)  # into the activation's fresh output: one [..., I] tensor, not two
