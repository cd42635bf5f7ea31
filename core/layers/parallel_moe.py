"""The tensor-parallel sparse MoE block (vLLM's default split): every rank holds every expert, each with its slice of
the intermediate dimension (its rows of gate and of up in ``w13``, the matching columns of ``w2``), and the router
(and Qwen2-MoE's sigmoid shared-expert gate) replicated. Each rank's expert mix is then a partial sum over the
intermediate dimension, as is its shared expert's down projection (sharded like the dense MLP); the sigmoid scale is
the same on every rank, so one all-reduce of their sum gives the block's output.
"""

from __future__ import annotations

import torch

from core.distributed.parallel_state import TensorParallelGroup
from core.layers.moe import SparseMoeBlock


class ParallelSparseMoeBlock(SparseMoeBlock):
    """A :class:`SparseMoeBlock` built with the rank's ``inter`` (and shared-expert width), plus the one all-reduce."""

    tp_group: TensorParallelGroup

    @classmethod
    def adopt(cls, block: SparseMoeBlock, group: TensorParallelGroup) -> "ParallelSparseMoeBlock":
        """Make a model's block (already built with the rank's widths) parallel in place; parameter names stay."""
        block.__class__ = cls
        block.tp_group = group
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The shared expert's down projection is a plain Linear here: its partial product joins the experts' partial
        # sum before the single all-reduce (a row-parallel layer would add a second one).
        return self.tp_group.all_reduce(super().forward(x))
