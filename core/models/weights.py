"""Weight loading and dummy initialization shared by every family: a family only says where each HF tensor goes."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from core.layers.attention import load_kv_scale

# A family's placement rule: HF name + tensor -> (our parameter name, first row or None for the whole parameter,
# tensor to copy) for each destination; an empty list skips the tensor (buffers, tied heads).
Placement = Callable[[str, torch.Tensor], Iterable[tuple[str, int | None, torch.Tensor]]]


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], place: Placement,
                 architecture: str) -> set[str]:  # fmt: skip
    """Copy every checkpoint tensor where ``place`` says; raise on unknown names, wrong shapes, or parameters (or row
    ranges of merged ones) the checkpoint left empty; then let quantized layers convert what they loaded
    (``process_weights_after_loading``). Returns the names of the filled parameters.

    A merged projection's ``row`` is its first output channel; a parameter's layout attributes (set by quantized
    layers, ``core/layers/quantization/base.py``) say where that lands: ``output_dim`` (which dim holds output
    channels; None: one copy shared by every shard, e.g. GPTQ's ``g_idx``), ``pack_factor`` (output channels packed
    that many per element along ``output_dim``) and ``shard_offsets`` (one value per merged shard: per-tensor
    scales)."""
    params = dict(model.named_parameters())
    units_filled = {name: 0 for name in params}
    for name, tensor in weights:
        if load_kv_scale(model, name, tensor):  # fp8 KV-cache scales belong to the attention layers, not parameters
            continue
        for target, row, value in place(name, tensor):
            if target not in params:
                raise ValueError(f"Checkpoint tensor '{name}' has no place in {architecture}.")
            param = params[target]
            dest, value, units = _destination(param, row, value)
            if dest.shape != value.shape:
                raise ValueError(f"Shape mismatch for '{name}': checkpoint {tuple(value.shape)}, "
                                 f"model {tuple(dest.shape)}.")  # fmt: skip
            if getattr(param, "output_dim", 0) is None and units_filled[target] and not torch.equal(dest, value.to(
                    dest.device, dest.dtype)):  # fmt: skip
                raise ValueError(f"Checkpoint tensor '{name}' differs from the one already loaded into the merged "
                                 f"parameter '{target}' (its shards must share it).")
            dest.copy_(value)
            units_filled[target] += units
    missing = sorted(name for name, units in units_filled.items() if units < _total_units(params[name]))
    if missing:
        raise ValueError(f"Checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}.")
    process_weights_after_loading(model)
    return set(params)


def _total_units(param: torch.Tensor) -> int:
    """What a fully loaded parameter counts: output channels (packed), shards, or 1 for a shared one."""
    offsets = getattr(param, "shard_offsets", None)
    if offsets is not None:
        return len(offsets)
    dim = getattr(param, "output_dim", 0)
    if dim is None or param.dim() == 0:
        return 1
    return param.shape[dim]


def _destination(param: torch.Tensor, row: int | None, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(the slice of ``param`` that ``value`` fills, ``value`` reshaped if needed, units it fills) for a checkpoint
    tensor whose output channels start at ``row`` (None: the whole parameter)."""
    offsets = getattr(param, "shard_offsets", None)
    if offsets is not None:  # one scalar per shard
        if row is not None and row not in offsets:
            raise ValueError(f"No shard of a merged parameter starts at output channel {row} (shards: {offsets}).")
        index = 0 if row is None else offsets.index(row)
        if row is None and len(offsets) > 1:  # a fused checkpoint tensor: one scale per shard, or one for all
            return param.data, value.reshape(1).expand(len(offsets)) if value.numel() == 1 else value, len(offsets)
        return param.data[index : index + 1], value.reshape(1) if value.numel() == 1 else value, 1
    dim = getattr(param, "output_dim", 0)
    if dim is None or param.dim() == 0:
        return param.data, value, 1
    if row is None:
        return param.data, value, param.shape[dim]
    start = row // getattr(param, "pack_factor", 1)
    length = value.shape[dim] if value.dim() > dim else 0
    return param.data.narrow(dim, start, length), value, length


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every quantized layer turn its loaded tensors into its kernel's layout (quantize, repack, fold scales)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def rename(mapping: dict[str, str], name: str) -> str:
    """Replace the first ``.key.`` of ``mapping`` found in ``name`` (with dots, so ``fc1`` never matches ``fc11``)."""
    for old, new in mapping.items():
        if f".{old}." in f".{name}.":
            return f".{name}.".replace(f".{old}.", f".{new}.", 1)[1:-1]
    return name


def init_dummy_weights(model: nn.Module, seed: int = 0, norm_value: Callable[[str], float] | None = None) -> None:
    """Random weights for benchmarks (speed does not depend on values): small uniform; norm weights at
    ``norm_value(name)`` (default 1), biases of norms at 0; a parameter with a ``dummy_fill(tensor, generator)``
    attribute (quantized layers' packed ints, scales, group indices) fills itself. Quantized layers then process
    them as after a real load."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        is_norm = "norm" in name.rsplit(".", 2)[-2] if "." in name else False
        fill = getattr(param, "dummy_fill", None)
        if fill is not None:
            fill(param.data, gen)
        elif is_norm and name.endswith(".weight"):
            param.data.fill_(1.0 if norm_value is None else norm_value(name))
        elif is_norm and name.endswith(".bias"):
            param.data.zero_()
        elif param.device.type == "cpu":
            param.data.copy_(torch.empty(param.shape).uniform_(-1e-3, 1e-3, generator=gen))
        else:  # draw on the GPU: fast for 8B models
            param.data.uniform_(-1e-3, 1e-3)
    process_weights_after_loading(model)
