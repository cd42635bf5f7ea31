"""The two interfaces every quantization method implements.

``QuantConfig``: what a checkpoint's ``quantization_config`` (or ``--quantization``) says, parsed once; it hands
each linear layer its ``LinearMethod`` (or None: that layer stays unquantized).

``LinearMethod``: how one ``Linear`` stores its weight and multiplies with it. ``create_weights`` registers the
parameters the checkpoint fills (in the checkpoint's own layout, with the layout attributes below), the loader
copies tensors in, ``process_weights_after_loading`` converts them once into the kernel's layout, and ``apply``
runs the matmul.

Layout attributes on parameters, honoured by ``core/models/weights.py`` when it loads one shard (q, k, v; gate, up)
of a merged projection into its slice:

- ``output_dim``: the dim that holds output channels (default 0, like a plain ``[out, in]`` weight); None: the
  parameter is not split by output channel and every shard holds the same copy (GPTQ's ``g_idx``).
- ``pack_factor``: output channels packed per element along ``output_dim`` (8 for int4 in int32; a Fraction where
  a run of codes fills several int32s, GPTQ 3-bit's 32 in 3); a shard starting at output channel ``row`` starts at
  ``row // pack_factor``.
- ``shard_offsets``: the parameter holds one value per shard (per-tensor scales); ``row`` picks the entry.
- ``dummy_fill(tensor, generator)``: how ``--load-format dummy`` fills it (packed ints, valid group indices).
"""

from __future__ import annotations

import copy
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from kernels.fp8_linear import Fp8Activations, NormedRows

DummyFill = Callable[[torch.Tensor, torch.Generator], None]


def new_parameter(layer: nn.Module, name: str, shape: Sequence[int], dtype: torch.dtype, *,
                  output_dim: int | None = 0, pack_factor: int | Fraction = 1,
                  shard_offsets: Sequence[int] | None = None,
                  dummy_fill: DummyFill | None = None) -> nn.Parameter:  # fmt: skip
    """An uninitialized, frozen parameter registered on ``layer`` with its layout attributes (module docstring)."""
    param = nn.Parameter(torch.empty(tuple(shape), dtype=dtype), requires_grad=False)
    param.output_dim = output_dim
    param.pack_factor = pack_factor
    if shard_offsets is not None:
        param.shard_offsets = tuple(shard_offsets)
    if dummy_fill is not None:
        param.dummy_fill = dummy_fill
    layer.register_parameter(name, param)
    return param


def replace_parameter(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set (or swap a loaded parameter for) its processed form (new dtype or shape), freeing the old storage."""
    if hasattr(layer, name):
        delattr(layer, name)
    layer.register_parameter(name, nn.Parameter(value, requires_grad=False))


def shard_starts(output_sizes: Sequence[int]) -> tuple[int, ...]:
    """First output channel of each shard of a merged projection (q, k, v sizes -> 0, q, q + k)."""
    starts, total = [], 0
    for size in output_sizes:
        starts.append(total)
        total += size
    return tuple(starts)


class LinearMethod(ABC):
    """How one linear layer stores and multiplies its weight (see the module docstring)."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:  # fmt: skip
        """Register the parameters the checkpoint fills. ``output_sizes``: the merged shards' sizes (one entry for an
        unmerged layer); ``params_dtype``: the model's activation dtype."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Convert the loaded tensors into the kernel's layout (once, after the last tensor is loaded)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W^T (+ bias)`` in x's dtype."""

    def takes_fp8_activations(self, layer: nn.Module) -> bool:
        """Whether :meth:`apply_fp8_activations` uses the upstream quantization (a W8A8 method with dynamic per-token
        activation scales); the producer of x then quantizes in its own kernel."""
        return False

    def apply_fp8_activations(self, layer: nn.Module, x: Fp8Activations, bias: torch.Tensor | None) -> torch.Tensor:
        """:meth:`apply` on activations that come with their per-token e4m3 quantization; by default ``x.x``."""
        return self.apply(layer, x.x, bias)

    def may_rope_cache(self, layer: nn.Module, x: torch.Tensor | Fp8Activations | NormedRows) -> bool:
        """Whether :meth:`apply_rope_cache` might serve ``x`` (a qkv layer whose kernel can also do the attention
        prep). Cheap: a caller builds that kernel's inputs only when this says yes."""
        return False

    def apply_rope_cache(self, layer: nn.Module, x: torch.Tensor | Fp8Activations | NormedRows,
                         **rope) -> torch.Tensor | None:  # fmt: skip
        """The qkv product with the attention prep in its epilogue (``PagedAttention.fused_qkv_prep``'s ``rope``
        arguments): q ready for attention, or None where the kernel does not serve the call."""
        return None

    def may_norm_rows(self, layer: nn.Module) -> bool:
        """Whether this layer's decode kernel may apply the RMSNorm before it itself (``NormedRows``, to
        :meth:`apply_rope_cache` or :meth:`apply_silu_and_mul`). Cheap: a caller builds those rows only when this
        says yes, and still norms them itself where the kernel then declines the call."""
        return False

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor | Fp8Activations | NormedRows,
                           down: nn.Module) -> torch.Tensor | None:  # fmt: skip
        """A ``[gate | up]`` layer's ``silu_and_mul`` output from its GEMM's own launch, for the ``down`` layer
        that reads it, or None where this method has no such kernel for the pair (then project and activate)."""
        return None


class QuantConfig(ABC):
    """A parsed quantization method. Subclasses are registered in ``core/layers/quantization/__init__.py``.

    Split models (core/distributed) see a copy made for their part: a pipeline stage numbers its layers from 0, so
    ``layer_offset`` turns its module names back into the checkpoint's (:meth:`global_prefix`); a tensor-parallel
    rank's row-parallel layers hold ``1 / tp_size`` of their input features (:meth:`input_shards`)."""

    name: str = ""
    layer_offset: int = 0
    tp_size: int = 1
    row_parallel_modules: tuple[str, ...] = ()
    # The checkpoint quantized the untied LM head too (GPTQ's ``lm_head: true``; a compressed-tensors scheme whose
    # ignore list leaves it out): it is built as a layer of this method (:meth:`lm_head`)
    quantized_lm_head: bool = False

    @classmethod
    @abstractmethod
    def from_hf(cls, quantization_config: dict[str, Any]) -> QuantConfig:
        """Parse a checkpoint's ``quantization_config`` (ValueError naming what is not supported)."""

    @classmethod
    def online(cls) -> QuantConfig:
        """The method applied to an unquantized checkpoint at load (``--quantization fp8``); ValueError for methods
        that need a quantized checkpoint."""
        raise ValueError(f"--quantization {cls.name} needs a checkpoint quantized with {cls.name} (its config.json "
                         "'quantization_config'); this checkpoint is not quantized.")

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod | None:
        """The method for the linear layer with this HF module name (``model.layers.0.self_attn.q_proj``; merged
        projections pass their first shard's name); None leaves it unquantized (the checkpoint's ignore list)."""

    def summary(self) -> str:
        return self.name

    def methods(self) -> tuple[str, ...]:
        """The methods whose kernels the model's layers run (a family must serve each): this one's, or a
        mixed-precision checkpoint's several."""
        return (self.name,)

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """The checkpoint's (name, tensor) stream as the model loads it: a method drops the tensors its format
        carries beside the weights that have no parameter (compressed-tensors' ``weight_shape``)."""
        return weights

    def moe_method(self, prefix: str) -> Any:
        """How the sparse MoE block ``prefix`` (``model.layers.0.mlp``) stores and runs its experts (an object with
        ``create_weights(block) -> bool`` (whether it registered the experts' parameters),
        ``process_weights_after_loading`` and ``experts(block)``: the fused MoE kernel's ``w13``, ``w2`` and
        ``ExpertQuant``, e.g.
        ``fp8.Fp8MoEMethod``), or None to leave them unquantized. Methods without expert kernels raise, naming the
        block (GPTQ 8-bit its own way: the families list ``gptq`` for its 4-bit experts)."""
        raise ValueError(f"quantization {self.name} has no kernel for mixture-of-experts layers ({prefix}).")

    def permute_outputs(self, name: str, tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Checkpoint tensor ``name`` of a layer whose output features a family reorders at load (Falcon's fused
        qkv), as ``weight[order]`` would be: this default serves tensors indexed by output row first (weights, biases,
        per-channel and block scales, ``[out, ...]`` codes); per-tensor values pass unchanged. Methods whose tensors
        hold outputs elsewhere (packed columns) override it."""
        if tensor.dim() == 0 or tensor.shape[0] != order.numel():
            return tensor
        return tensor[order.to(tensor.device)]

    def lm_head(self, hidden_size: int, vocab_size: int, backend: str) -> nn.Module | None:
        """The untied LM head the checkpoint quantized (``quantized_lm_head``): a ``Linear`` of this method's whose
        ``compute_logits`` upcasts its product to fp32 (``core/layers/linear.py: QuantizedLMHead``); None: a 16-bit
        head. Under tensor parallelism ``vocab_size`` is the rank's rows, cut from the checkpoint as a column-parallel
        layer's outputs (``shard_tensor``)."""
        if not self.quantized_lm_head:
            return None
        from core.layers.linear import QuantizedLMHead

        return QuantizedLMHead(hidden_size, vocab_size, backend, self.linear_method("lm_head"))

    def for_stage(self, first_layer: int) -> QuantConfig:
        """This config for a pipeline stage whose layer 0 is the checkpoint's ``first_layer``."""
        part = copy.copy(self)
        part.layer_offset = self.layer_offset + first_layer
        return part

    def for_tensor_parallel(self, tp: int, row_parallel_modules: Sequence[str]) -> QuantConfig:
        """This config for one of ``tp`` ranks, whose modules named in ``row_parallel_modules`` (``o_proj``) hold a
        slice of their input features."""
        part = copy.copy(self)
        part.tp_size, part.row_parallel_modules = tp, tuple(row_parallel_modules)
        return part

    def global_prefix(self, prefix: str) -> str:
        """A module name of this (stage's) model as the checkpoint names it: ``layers.N`` renumbered."""
        if not self.layer_offset:
            return prefix
        return _LAYER_INDEX.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + self.layer_offset}", prefix, count=1)

    def input_shards(self, prefix: str) -> int:
        """How many ranks share the input features of the linear layer ``prefix`` (1: it holds all of them)."""
        return self.tp_size if prefix.rsplit(".", 1)[-1] in self.row_parallel_modules else 1

    def shard_tensor(self, name: str, tensor: torch.Tensor, parallel: str, start: int, length: int) -> torch.Tensor:
        """A tensor-parallel rank's part of the checkpoint tensor ``name`` of a linear layer: output features
        ``start .. start + length`` (``parallel="column"``) or input features (``"row"``). This default serves
        ``[out, in]`` weights and biases (unquantized, or quantized at load); methods with other layouts
        override it and raise ValueError, naming the layer's sizes, where a slice would cut a packed unit."""
        return plain_shard(tensor, parallel, start, length)


def whole_units(method: str, layer: str, parallel: str, start: int, length: int, size: int, what: str
                ) -> tuple[int, int]:  # fmt: skip
    """A rank's features ``start .. start + length`` of ``layer`` as whole units of ``size`` (packed int32s, groups):
    ``(first unit, units)``, else a ValueError naming the layer and the unit."""
    if start % size or length % size:
        raise ValueError(f"{method}: {layer} cannot be split over the ranks: each rank's {length} "
                         f"{'output' if parallel == 'column' else 'input'} features (from {start}) are not whole "
                         f"{what} of {size}; use fewer ranks or a checkpoint with smaller groups.")
    return start // size, length // size


_LAYER_INDEX = re.compile(r"(\blayers\.)(\d+)")


def module_listed(patterns: Sequence[str], name: str) -> bool:
    """Whether the checkpoint's list of unquantized modules names module ``name``: a run of its dotted parts
    (AutoAWQ's ``modules_to_not_convert``, bitsandbytes' ``llm_int8_skip_modules``), or a ``re:`` pattern matching
    it whole (compressed-tensors' ``ignore``)."""
    for pattern in patterns:
        if pattern.startswith("re:") and re.fullmatch(pattern[3:], name):
            return True
        if not pattern.startswith("re:") and f".{pattern}." in f".{name}.":
            return True
    return False


def plain_shard(tensor: torch.Tensor, parallel: str, start: int, length: int) -> torch.Tensor:
    """The rank's part of an ``[out, in]`` weight or an ``[out]`` bias (a row-parallel layer's bias, which
    ``RowParallelLinear`` refuses, passes whole)."""
    if parallel == "column":
        return tensor.narrow(0, start, length)
    return tensor if tensor.dim() == 1 else tensor.narrow(1, start, length)
