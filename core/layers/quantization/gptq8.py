"""GPTQ 8-bit checkpoints (AutoGPTQ / GPTQModel v1 with ``bits: 8``, e.g. Qwen's GPTQ-Int8 releases), w8a16.

Per linear layer: ``qweight`` int32 ``[in / 4, out]`` (input row ``4p + i`` in bits ``8i .. 8i + 7`` of word
``p``), ``qzeros`` int32 ``[groups, out / 4]`` (output column ``4p + i`` likewise; v1 stores ``zero - 1``),
``scales`` ``[groups, out]`` and ``g_idx`` ``[in]``: ``W[k, n] = (q[k, n] - zero[g, n]) * scale[g, n]`` for
``g = g_idx[k]``. The layer holds the codes as uint8 ``[out, in]`` and the scales and zero points ``[out,
groups]`` in fp32 for ``kernels/int8_gemm.py``; act-order (``desc_act``) layers have their input rows sorted by
group and gather x's columns by the same permutation, as the int4 layers do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from core.layers.quantization.base import (LinearMethod, QuantConfig, new_parameter, plain_shard, replace_parameter,
                                           whole_units)
from kernels.int8_gemm import int8_linear

PACK = 4  # 8-bit values per int32


def unpack_int8_rows(packed: torch.Tensor) -> torch.Tensor:
    """``[rows / 4, cols]`` int32 -> ``[rows, cols]`` codes 0..255: row ``4p + i`` is byte ``i`` of word ``p``."""
    shifts = torch.arange(0, 32, 8, device=packed.device)
    codes = (packed.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & 0xFF
    return codes.reshape(-1, packed.shape[1])


def unpack_int8_columns(packed: torch.Tensor) -> torch.Tensor:
    """``[rows, cols / 4]`` int32 -> ``[rows, cols]``: column ``4p + i`` is byte ``i`` of word ``p``."""
    return unpack_int8_rows(packed.t().contiguous()).t()


class GPTQInt8Config(QuantConfig):
    name = "gptq"

    def __init__(self, *, group_size: int, desc_act: bool) -> None:
        self.group_size = group_size  # -1: one group over the whole input dim
        self.desc_act = desc_act

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> GPTQInt8Config:
        group = int(qc.get("group_size", 128))
        if group != -1 and (group <= 0 or group % 32):
            raise ValueError(f"GPTQ 8-bit group_size {group} is not supported; supported: multiples of 32, or -1.")
        return cls(group_size=group, desc_act=bool(qc.get("desc_act", False)))

    def linear_method(self, prefix: str) -> LinearMethod | None:
        return GPTQInt8LinearMethod(self, self.input_shards(prefix))

    def shard_tensor(self, name: str, tensor: torch.Tensor, parallel: str, start: int, length: int) -> torch.Tensor:
        """Packed codes by whole int32s of 4, zero points and scales by columns or whole groups."""
        suffix = name.rsplit(".", 1)[-1]
        if suffix not in ("qweight", "qzeros", "scales", "g_idx"):
            return plain_shard(tensor, parallel, start, length)
        layer = name.rsplit(".", 1)[0]

        def units(size: int, what: str) -> tuple[int, int]:
            return whole_units("GPTQ 8-bit", layer, parallel, start, length, size, what)

        if parallel == "column":
            if suffix == "g_idx":
                return tensor
            first, count = units(PACK, "int32s of 4 codes") if suffix == "qzeros" else (start, length)
            return tensor.narrow(1, first, count)
        if suffix == "qweight":
            return tensor.narrow(0, *units(PACK, "int32s of 4 codes"))
        if self.group_size == -1:
            return tensor.narrow(0, start, length) if suffix == "g_idx" else tensor
        first, count = units(self.group_size, f"groups (group_size={self.group_size})")
        if suffix == "g_idx":
            return tensor.narrow(0, start, length) - first
        return tensor.narrow(0, first, count)

    def summary(self) -> str:
        return f"gptq 8-bit (group {self.group_size}{', act-order' if self.desc_act else ''})"


def _natural_groups(group: int, in_features: int):
    def fill(tensor: torch.Tensor, gen: torch.Generator) -> None:
        tensor.copy_(torch.arange(in_features, dtype=torch.int32) // group)

    return fill


def _fill_words(tensor: torch.Tensor, gen: torch.Generator) -> None:
    tensor.copy_(torch.randint(-(2**31), 2**31 - 1, tensor.shape, dtype=torch.int32, generator=gen))


def _fill_scales(tensor: torch.Tensor, gen: torch.Generator) -> None:
    tensor.copy_(torch.rand(tensor.shape, generator=gen) * 1e-4 + 1e-4)


class GPTQInt8LinearMethod(LinearMethod):
    """The layer's GPTQ tensors as loaded, then uint8 codes ``[out, in]`` with fp32 scales and zero points ``[out,
    groups]`` (module docstring)."""

    def __init__(self, config: GPTQInt8Config, input_shards: int = 1) -> None:
        self.config, self.input_shards = config, input_shards  # ranks sharing the layer's input features

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:  # fmt: skip
        group = in_features if self.config.group_size == -1 else self.config.group_size
        out = sum(output_sizes)
        if self.config.desc_act and self.input_shards > 1:
            raise ValueError("GPTQ 8-bit act-order (desc_act) layers cannot be split over tensor-parallel ranks (each "
                             "rank's input rows fall unevenly into the groups); supported: desc_act false.")
        if in_features % group or in_features % PACK or any(size % PACK for size in output_sizes):
            raise ValueError(f"GPTQ 8-bit: a layer of {in_features} inputs and outputs {tuple(output_sizes)} does not "
                             f"fit groups of {group} and the packing of {PACK} codes an int32.")
        groups = in_features // group
        layer.group_size = group
        new_parameter(layer, "qweight", (in_features // PACK, out), torch.int32, output_dim=1, dummy_fill=_fill_words)
        new_parameter(layer, "qzeros", (groups, out // PACK), torch.int32, output_dim=1, pack_factor=PACK,
                      dummy_fill=_fill_words)
        new_parameter(layer, "scales", (groups, out), params_dtype, output_dim=1, dummy_fill=_fill_scales)
        new_parameter(layer, "g_idx", (in_features,), torch.int32, output_dim=None,
                      dummy_fill=_natural_groups(group, in_features))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q = unpack_int8_rows(layer.qweight.data)  # [in, out]
        zeros = unpack_int8_columns(layer.qzeros.data) + 1  # v1 stores zero - 1
        scales, g_idx = layer.scales.data, layer.g_idx.data.long()
        group = layer.group_size
        natural = torch.arange(q.shape[0], device=q.device) // group
        perm = None
        if not torch.equal(g_idx, natural):  # act order: rows sorted by group
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], natural):
                raise ValueError(f"GPTQ 8-bit: a layer's g_idx does not put {group} input rows in each group.")
            q = q[perm]
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            delattr(layer, name)
        replace_parameter(layer, "weight", q.t().to(torch.uint8).contiguous())
        replace_parameter(layer, "weight_scale", scales.t().float().contiguous())
        replace_parameter(layer, "weight_zeros", zeros.t().float().contiguous())
        layer.perm = perm

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.perm is not None:
            x = x[..., layer.perm]
        return int8_linear(x, layer.weight, layer.weight_scale, bias, zeros=layer.weight_zeros,
                           group=layer.group_size, backend=layer.backend)
