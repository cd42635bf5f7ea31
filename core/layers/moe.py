"""Sparse mixture-of-experts MLP: a router, the experts' weights stacked into ``[experts, ...]`` tensors for the fused
kernel (kernels/fused_moe.py), and optionally a dense shared expert behind a sigmoid gate (Qwen2-MoE).

The stacked weights are stored as 2-D parameters (``w13``: ``[E * 2I, H]``, ``w2``: ``[E * H, I]``) and viewed as 3-D
in ``forward``: the loader places each HF per-expert tensor as a block of rows (expert ``e``'s gate at rows
``e*2I``, its up at ``e*2I + I``, its down at ``e*H``), like any merged projection. Under tensor parallelism the
block is built with the rank's slice of every expert's intermediate dimension and adds one all-reduce
(core/layers/parallel_moe.py); expert parallelism (whole experts per rank) is not implemented.
"""

from __future__ import annotations

import torch
from torch import nn

from core.layers.linear import Linear
from core.layers.quantization import QuantConfig, linear_method
from kernels.activation import silu_and_mul
from kernels.backend import check_backend
from kernels.fused_moe import fused_moe


class SharedExpert(nn.Module):
    """A dense gated MLP added to every token's expert mix, scaled by ``sigmoid(x @ gate)`` when ``gated``."""

    def __init__(self, hidden: int, inter: int, gated: bool, kernel_backend: str,
                 quant: QuantConfig | None = None, prefix: str = "") -> None:  # fmt: skip
        super().__init__()
        self.kernel_backend = kernel_backend
        self.gate_up_proj = Linear(hidden, 2 * inter, backend=kernel_backend, output_sizes=(inter, inter),
                                   quant_method=linear_method(quant, f"{prefix}.gate_proj"))
        self.down_proj = Linear(inter, hidden, backend=kernel_backend,
                                quant_method=linear_method(quant, f"{prefix}.down_proj"))
        self.gate = Linear(hidden, 1, backend=kernel_backend) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(silu_and_mul(self.gate_up_proj(x), backend=self.kernel_backend))
        return out if self.gate is None else torch.sigmoid(self.gate(x)) * out


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int, renormalize: bool, *,
                 kernel_backend: str, shared_expert_inter: int = 0, shared_expert_gated: bool = True,
                 quant: QuantConfig | None = None, prefix: str = "") -> None:  # fmt: skip
        """``quant``: the model's quantization (its ``moe_method`` stores and runs the experts; the router stays
        unquantized); ``prefix``: the HF module name (``model.layers.0.mlp``), for its per-layer choices."""
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be between 1 and the number of experts ({num_experts}).")
        self.kernel_backend = check_backend(kernel_backend)
        self.hidden, self.inter, self.num_experts, self.top_k = hidden, inter, num_experts, top_k
        self.renormalize = renormalize
        self.gate = Linear(hidden, num_experts, backend=kernel_backend)  # the router
        self.quant_method = quant.moe_method(prefix) if quant is not None else None
        if self.quant_method is None or not self.quant_method.create_weights(self):
            self.w13 = nn.Parameter(torch.empty(num_experts * 2 * inter, hidden), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(num_experts * hidden, inter), requires_grad=False)
        self.shared_expert = (SharedExpert(hidden, shared_expert_inter, shared_expert_gated, kernel_backend, quant,
                                           f"{prefix}.shared_expert") if shared_expert_inter else None)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:  # the experts as the method stores them (kernels/fused_moe.py)
            w13, w2, quant = self.quant_method.experts(self)
        else:
            w13, w2 = self.w13.view(self.num_experts, -1, self.hidden), self.w2.view(self.num_experts, self.hidden, -1)
            quant = None
        out = fused_moe(x, w13, w2, self.gate(x), self.top_k, self.renormalize, backend=self.kernel_backend,
                        quant=quant)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out
