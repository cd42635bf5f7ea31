"""AWQ and GPTQ int4 weights (w4a16): both loaded in their checkpoint layouts, then repacked into one kernel layout.

Checkpoint layouts (``y = x @ W`` with ``W[k, n] = (q[k, n] - zero[g, n]) * scale[g, n]``, ``g`` the group of input
row ``k``):

- AutoAWQ GEMM: ``qweight`` int32 ``[in, out / 8]``, eight output columns per int32 in AWQ's interleaved nibble
  order (nibble ``i`` holds column ``AWQ_ORDER[i]`` of the eight); ``qzeros`` int32 ``[in / group, out / 8]`` in
  the same order; ``scales`` ``[in / group, out]``; groups are consecutive input rows.
- GPTQ v1: ``qweight`` int32 ``[in / 8, out]``, eight input rows per int32 (nibble ``i`` = row ``8j + i``);
  ``qzeros`` int32 ``[groups, out / 8]`` (sequential nibbles) storing ``zero - 1``; ``scales`` ``[groups, out]``;
  ``g_idx`` int32 ``[in]``: the group of each input row (with ``desc_act`` / act-order, not ``k // group``).

Kernel layout (``kernels/int4_gemm.py: pack_int4_kernel``): ``qweight`` int32 ``[out, in / 8]``, each output
column's codes contiguous along the input dim (interleaved within blocks of 32 rows, for the decode kernel's wide
loads), groups of consecutive rows, ``scales`` and ``zeros`` (as numbers) ``[groups, out]`` in the activation dtype,
and for act-order checkpoints a permutation of the input rows (x's columns are gathered by it before the GEMM).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from core.layers.quantization.base import LinearMethod, QuantConfig, new_parameter, replace_parameter
from kernels.backend import use_triton
from kernels.int4_gemm import (AWQ_ORDER, KERNEL_K_BLOCK, int4_linear, int4_qkv_rope_cache, pack_int4_kernel,
                               tile_int4, tiled_layout_pays, unpack_int4_columns, unpack_int4_rows)
from kernels.int4_gemv_gluon import MAX_M as INT4_GEMV_MAX_M

PACK = 8  # int4 values per int32


def _bits_and_group(qc: dict[str, Any], method: str) -> tuple[int, int]:
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"{method} with {bits}-bit weights is not supported; supported: 4-bit.")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if group != -1 and group <= 0:
        raise ValueError(f"{method} group_size {group} is not valid (a positive size, or -1 for one group).")
    return bits, group


class _Int4Config(QuantConfig):
    def __init__(self, *, group_size: int, zero_point: bool, desc_act: bool = False,
                 skipped: Sequence[str] = ()) -> None:  # fmt: skip
        self.group_size = group_size  # -1: one group over the whole input dim
        self.zero_point = zero_point
        self.desc_act = desc_act
        self.skipped = tuple(skipped)

    def linear_method(self, prefix: str) -> LinearMethod | None:
        if any(f".{name}." in f".{prefix}." for name in self.skipped):
            return None
        return Int4LinearMethod(self)

    def summary(self) -> str:
        extra = ", act-order" if self.desc_act else ""
        zeros = "zero points" if self.zero_point else "symmetric"
        return f"{self.name} int4 (group {self.group_size}, {zeros}{extra})"


class AWQConfig(_Int4Config):
    name = "awq"

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> AWQConfig:
        _, group = _bits_and_group(qc, "AWQ")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported; supported: gemm (AutoAWQ's GEMM packing).")
        if not qc.get("zero_point", True):
            raise ValueError("AWQ without zero points (zero_point: false) is not supported; supported: AutoAWQ GEMM "
                             "checkpoints with zero points.")
        return cls(group_size=group, zero_point=True,
                   skipped=qc.get("modules_to_not_convert") or ())


class GPTQConfig(_Int4Config):
    name = "gptq"

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> GPTQConfig:
        _, group = _bits_and_group(qc, "GPTQ")
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt != "gptq":
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; supported: gptq (v1).")
        if qc.get("dynamic"):
            raise ValueError("GPTQ 'dynamic' per-module overrides are not supported.")
        if qc.get("lm_head"):
            raise ValueError("GPTQ checkpoints with a quantized lm_head are not supported.")
        return cls(group_size=group, zero_point=not qc.get("sym", True), desc_act=bool(qc.get("desc_act", False)))


def _fill_random_int32(tensor: torch.Tensor, gen: torch.Generator) -> None:
    if tensor.device.type == "cpu":
        tensor.copy_(torch.randint(-(2**31), 2**31 - 1, tensor.shape, dtype=torch.int32, generator=gen))
    else:
        tensor.random_(-(2**31), 2**31 - 1)


def _fill_scales(tensor: torch.Tensor, gen: torch.Generator) -> None:
    if tensor.device.type == "cpu":
        tensor.copy_(torch.empty(tensor.shape).uniform_(1e-4, 2e-4, generator=gen))
    else:
        tensor.uniform_(1e-4, 2e-4)


class Int4LinearMethod(LinearMethod):
    """One method for both layouts; ``process_weights_after_loading`` repacks into the kernel's."""

    def __init__(self, config: _Int4Config) -> None:
        self.config = config
        self.is_awq = config.name == "awq"

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:  # fmt: skip
        out = sum(output_sizes)
        group = in_features if self.config.group_size == -1 else self.config.group_size
        name = self.config.name
        if in_features % group or in_features % PACK:
            raise ValueError(f"{name}: a layer's input size {in_features} must be a multiple of the group size "
                             f"{group} and of {PACK}.")
        if in_features % KERNEL_K_BLOCK:
            raise ValueError(f"{name}: a layer's input size {in_features} must be a multiple of {KERNEL_K_BLOCK} "
                             "(the int4 kernels' layout interleaves codes in blocks of 32 input rows).")
        if any(size % PACK for size in output_sizes):
            raise ValueError(f"{name}: output sizes {tuple(output_sizes)} must be multiples of {PACK} (int4 packing).")
        groups = in_features // group
        layer.group_size = group
        # q, k, v shards (the last two alike): a qkv projection, whose GEMV may do the attention prep
        layer.int4_qkv = len(output_sizes) == 3 and output_sizes[1] == output_sizes[2]

        def g_idx_fill(tensor: torch.Tensor, gen: torch.Generator) -> None:
            tensor.copy_(torch.arange(in_features, dtype=torch.int32) // group)

        if self.is_awq:
            new_parameter(layer, "qweight", (in_features, out // PACK), torch.int32, output_dim=1,
                          pack_factor=PACK, dummy_fill=_fill_random_int32)
        else:
            new_parameter(layer, "qweight", (in_features // PACK, out), torch.int32, output_dim=1,
                          dummy_fill=_fill_random_int32)
            new_parameter(layer, "g_idx", (in_features,), torch.int32, output_dim=None, dummy_fill=g_idx_fill)
        new_parameter(layer, "qzeros", (groups, out // PACK), torch.int32, output_dim=1, pack_factor=PACK,
                      dummy_fill=_fill_random_int32)
        new_parameter(layer, "scales", (groups, out), params_dtype, output_dim=1, dummy_fill=_fill_scales)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        group = layer.group_size
        scales = layer.scales.data
        if self.is_awq:
            q = unpack_int4_columns(layer.qweight.data, AWQ_ORDER)  # [in, out]
            zeros = unpack_int4_columns(layer.qzeros.data, AWQ_ORDER)
            perm = None
        else:
            q = unpack_int4_rows(layer.qweight.data)  # [in, out]
            zeros = unpack_int4_columns(layer.qzeros.data) + 1  # GPTQ v1 stores zero - 1 (sym: 7, so 8)
            g_idx = layer.g_idx.data.long()
            in_features = q.shape[0]
            natural = torch.arange(in_features, device=g_idx.device) // group
            perm = None
            if not torch.equal(g_idx, natural):
                perm = torch.argsort(g_idx, stable=True)
                if not torch.equal(g_idx[perm], natural):
                    raise ValueError(f"GPTQ g_idx of a layer does not put exactly {group} input rows in each group.")
                q = q[perm]
                perm = perm.to(torch.int32)
            delattr(layer, "g_idx")
        qweight, scales, zeros = pack_int4_kernel(q), scales.contiguous(), zeros.to(scales.dtype).contiguous()
        # The tiled layout where the Gluon GEMV serves decode rows, but not for a qkv projection (its GEMV's rotary
        # epilogue reads the plain layout)
        layer.tiled = not layer.int4_qkv and tiled_layout_pays(qweight, scales, group)
        if layer.tiled:
            qweight, scales, zeros = tile_int4(qweight, scales, zeros)
        replace_parameter(layer, "qweight", qweight)
        delattr(layer, "qzeros")
        replace_parameter(layer, "scales", scales)
        replace_parameter(layer, "zeros", zeros)
        layer.perm = perm

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int4_linear(x, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.perm, bias,
                           backend=layer.backend, tiled=layer.tiled)

    def may_rope_cache(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Decode rows on the GPU (the Gluon GEMV's few rows) of a qkv layer without a bias."""
        return (isinstance(x, torch.Tensor) and x.is_cuda and x.dim() == 2 and x.shape[0] <= INT4_GEMV_MAX_M
                and layer.bias is None and not layer.tiled and use_triton(x, layer.backend))  # fmt: skip

    def apply_rope_cache(self, layer: nn.Module, x: torch.Tensor, **rope) -> torch.Tensor | None:
        """The qkv product with the attention prep in the int4 GEMV's epilogue (``int4_qkv_rope_cache``), or None
        where that kernel does not serve it."""
        if not self.may_rope_cache(layer, x):
            return None
        return int4_qkv_rope_cache(x, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.perm, **rope)
