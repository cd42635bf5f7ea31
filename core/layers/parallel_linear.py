"""Tensor-parallel layers (Megatron's split): column-parallel projections are plain ``Linear`` layers holding their
rank's output rows (no communication), a row-parallel one holds its rank's input columns and sums the partial
products with one all-reduce, and the vocabulary is split in contiguous row ranges for the embedding and the LM head.

Sharding a checkpoint tensor is the weight loader's concern (core/distributed/tensor_parallel.py): these layers only
add the collectives, so they stay subclasses of the single-device layers (whatever a ``Linear`` gains, e.g. a
quantization method, the parallel ones keep).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from core.distributed.parallel_state import TensorParallelGroup
from core.layers.linear import Linear


class RowParallelLinear(Linear):
    """``y = sum over ranks of x_r W_r^T``: ``x`` is the rank's slice of the input features (the output of a
    column-parallel layer), ``W_r`` the matching columns of the weight. One all-reduce."""

    tp_group: TensorParallelGroup

    @classmethod
    def adopt(cls, layer: Linear, group: TensorParallelGroup) -> "RowParallelLinear":
        """Turn a model's ``Linear`` (already built with the rank's input width) into a row-parallel one in place:
        parameter names and any state it carries stay as they are."""
        if layer.bias is not None:
            raise ValueError("a row-parallel layer with a bias is not supported (each rank would add it)")
        layer.__class__ = cls
        layer.tp_group = group
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp_group.all_reduce(super().forward(x))


def vocab_shard_size(vocab_size: int, world_size: int) -> int:
    """Rows of the vocabulary each rank holds: the last rank's range is padded with zero rows."""
    return -(-vocab_size // world_size)


class VocabParallelEmbedding(nn.Module):
    """The rank's rows ``[rank * n, (rank + 1) * n)`` of the embedding; ids outside them give zeros, and the sum over
    ranks is each id's row. Adopted by a table of any kind (``Embedding``, a GGUF table kept in its blocks): the
    lookup is the table's own, on the rank's rows."""

    tp_group: TensorParallelGroup
    vocab_start: int

    @classmethod
    def adopt(cls, layer: nn.Module, group: TensorParallelGroup) -> "VocabParallelEmbedding":
        layer.__class__ = _vocab_parallel_class(type(layer))
        layer.tp_group = group
        layer.vocab_start = group.rank * layer.weight.shape[0]
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = super().forward(local.masked_fill(outside, 0))
        return self.tp_group.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0.0))


@functools.cache
def _vocab_parallel_class(table: type) -> type:
    """``VocabParallelEmbedding`` over ``table``'s lookup (and its other methods: a GGUF table's
    ``compute_logits``, when it is a tied LM head too)."""
    return type(f"VocabParallel{table.__name__}", (VocabParallelEmbedding, table), {})


class GatheredLogits:
    """A model's ``compute_logits`` on the rank's vocabulary rows, gathered over the ranks and cut to the true
    vocabulary: every rank gets the full ``[n, vocab]`` logits (rank 0 samples from them)."""

    def __init__(self, local_logits: Callable[[torch.Tensor], torch.Tensor], vocab_size: int,
                 group: TensorParallelGroup) -> None:
        self.local_logits = local_logits
        self.vocab_size = vocab_size
        self.group = group

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather_last_dim(self.local_logits(hidden))[:, : self.vocab_size]
