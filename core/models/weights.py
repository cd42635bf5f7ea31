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
    ranges of merged ones) the checkpoint left empty. Returns the names of the filled parameters."""
    params = dict(model.named_parameters())
    rows_filled = {name: 0 for name in params}
    for name, tensor in weights:
        if load_kv_scale(model, name, tensor):  # fp8 KV-cache scales belong to the attention layers, not parameters
            continue
        for target, row, value in place(name, tensor):
            if target not in params:
                raise ValueError(f"Checkpoint tensor '{name}' has no place in {architecture}.")
            param = params[target]
            dest = param.data if row is None else param.data[row : row + value.shape[0]]
            if dest.shape != value.shape:
                raise ValueError(f"Shape mismatch for '{name}': checkpoint {tuple(value.shape)}, "
                                 f"model {tuple(dest.shape)}.")  # fmt: skip
            dest.copy_(value)
            rows_filled[target] += param.shape[0] if row is None else value.shape[0]
    missing = sorted(name for name, rows in rows_filled.items() if rows < params[name].shape[0])
    if missing:
        raise ValueError(f"Checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}.")
    return set(params)


def rename(mapping: dict[str, str], name: str) -> str:
    """Replace the first ``.key.`` of ``mapping`` found in ``name`` (with dots, so ``fc1`` never matches ``fc11``)."""
    for old, new in mapping.items():
        if f".{old}." in f".{name}.":
            return f".{name}.".replace(f".{old}.", f".{new}.", 1)[1:-1]
    return name


def init_dummy_weights(model: nn.Module, seed: int = 0, norm_value: Callable[[str], float] | None = None) -> None:
    """Random weights for benchmarks (speed does not depend on values): small uniform; norm weights at
    ``norm_value(name)`` (default 1), biases of norms at 0."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        is_norm = "norm" in name.rsplit(".", 2)[-2] if "." in name else False
        if is_norm and name.endswith(".weight"):
            param.data.fill_(1.0 if norm_value is None else norm_value(name))
        elif is_norm and name.endswith(".bias"):
            param.data.zero_()
        elif param.device.type == "cpu":
            param.data.copy_(torch.empty(param.shape).uniform_(-1e-3, 1e-3, generator=gen))
        else:  # draw on the GPU: fast for 8B models
            param.data.uniform_(-1e-3, 1e-3)
