"""GPTQ 8-bit checkpoints (AutoGPTQ / GPTQModel v1 with ``bits: 8``, e.g. Qwen's GPTQ-Int8 releases), w8a16.

Per linear layer: ``qweight`` int32 ``[in / 4, out]`` (input row ``4p + i`` in bits ``8i .. 8i + 7`` of word
``p``), ``qzeros`` int32 ``[groups, out / 4]`` (output column ``4p + i`` likewise; v1 stores ``zero - 1``),
``scales`` ``[groups, out]`` and ``g_idx`` ``[in]``: ``W[k, n] = (q[k, n] - zero[g, n]) * scale[g, n]`` for
``g = g_idx[k]``. The layer holds the codes as uint8 ``[out, in]`` and the scales and zero points ``[out,
groups]`` in fp32 for ``kernels/int8_gemm.py``; act-order (``desc_act``) layers have their input rows sorted by
group and gather x's columns by the same permutation, as the int4 layers do (a tensor-parallel rank's share of a
row-parallel layer's inputs, which falls unevenly into the groups, regrouped into padded groups of 32 whose padding
rows weigh 0).

A MoE block's experts (``GPTQInt8MoEMethod``) load each expert's tensors into stacked ``{w13,w2}_qweight`` /
``_qzeros`` / ``_scales`` / ``_g_idx`` (as the int4 experts do), then become the 8-bit experts' kernel form
(``kernels/fused_moe.py``: ``ExpertQuant.w13_int8``): uint8 codes ``[E, N, K]``, fp32 scales and offsets
``o = -zero * scale`` ``[E, K / group, N]`` (``W = q s + o``). Act-order experts have each expert's input rows
sorted by group and the kernel reads the activations' columns through its permutation, as the int4 experts do.
Under tensor parallelism every rank holds every expert's slice of the intermediate dimension (codes, zero points and
scales cut as a dense layer's: by columns, or whole groups of down's inputs); an act-order down projection's rank
holds every group's scales and regroups each expert's rows into padded groups of 32, as the int4 experts do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from core.layers.quantization.base import LinearMethod, new_parameter, replace_parameter
from core.layers.quantization.int4 import (GPTQConfig, Int4MoEMethod, _fill_random_int32, _fill_scales,
                                           gptq_checkpoint_options, natural_groups, regroup_expert_rows,
                                           regrouped_expert_rows, rows_in_group_order)
from kernels.fused_moe import ExpertQuant
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


class GPTQInt8Config(GPTQConfig):
    """GPTQ's 4-bit config with four codes an int32: the same tensor names and tensor-parallel cuts
    (``_Int4Config.shard_tensor`` with ``pack`` 4), layers and experts of its own."""

    pack = PACK

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> GPTQInt8Config:
        group = int(qc.get("group_size", 128))
        if group != -1 and (group <= 0 or group % 32):
            raise ValueError(f"GPTQ 8-bit group_size {group} is not supported; supported: multiples of 32, or -1.")
        config = cls(group_size=group, zero_point=not qc.get("sym", True), desc_act=bool(qc.get("desc_act", False)))
        return gptq_checkpoint_options(config, qc)

    def layer_method(self, prefix: str) -> LinearMethod | None:
        return GPTQInt8LinearMethod(self, self.input_shards(prefix))

    def experts_method(self, prefix: str) -> GPTQInt8MoEMethod | None:
        return None if self.is_skipped(prefix) else GPTQInt8MoEMethod(self, prefix)

    def summary(self) -> str:
        rules = f", {len(self.dynamic_rules)} dynamic rules" if self.dynamic_rules else ""
        return f"gptq 8-bit (group {self.group_size}{', act-order' if self.desc_act else ''}{rules})"


class GPTQInt8LinearMethod(LinearMethod):
    """The layer's GPTQ tensors as loaded, then uint8 codes ``[out, in]`` with fp32 scales and zero points ``[out,
    groups]`` (module docstring)."""

    def __init__(self, config: GPTQInt8Config, input_shards: int = 1) -> None:
        self.config, self.input_shards = config, input_shards  # ranks sharing the layer's input features

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:  # fmt: skip
        group = in_features if self.config.group_size == -1 else self.config.group_size
        out = sum(output_sizes)
        # Act-order's row-parallel layers hold every group's scales: their rows need not fill whole groups
        all_groups = self.config.desc_act and self.config.group_size != -1 and self.input_shards > 1
        grouped = in_features * self.input_shards if all_groups else in_features
        if grouped % group or in_features % PACK or any(size % PACK for size in output_sizes):
            raise ValueError(f"GPTQ 8-bit: a layer of {in_features} inputs and outputs {tuple(output_sizes)} does not "
                             f"fit groups of {group} and the packing of {PACK} codes an int32.")
        groups = grouped // group
        layer.group_size = group
        new_parameter(layer, "qweight", (in_features // PACK, out), torch.int32, output_dim=1,
                      dummy_fill=_fill_random_int32)
        new_parameter(layer, "qzeros", (groups, out // PACK), torch.int32, output_dim=1, pack_factor=PACK,
                      dummy_fill=_fill_random_int32)
        new_parameter(layer, "scales", (groups, out), params_dtype, output_dim=1, dummy_fill=_fill_scales)
        new_parameter(layer, "g_idx", (in_features,), torch.int32, output_dim=None,
                      dummy_fill=natural_groups(group, in_features))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q = unpack_int8_rows(layer.qweight.data)  # [in, out]
        zeros = unpack_int8_columns(layer.qzeros.data) + self.config.zero_offset  # v1 stores zero - 1
        scales, g_idx = layer.scales.data, layer.g_idx.data.long()
        # act order: rows sorted by group; a rank's rows of an act-order layer (every group held) regrouped
        q, zeros, scales, perm, layer.group_size = rows_in_group_order(q, zeros, scales, g_idx, layer.group_size,
                                                                       "GPTQ 8-bit")  # fmt: skip
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


class GPTQInt8MoEMethod(Int4MoEMethod):
    """A MoE block's GPTQ 8-bit experts (module docstring): each expert's ``qweight`` / ``qzeros`` / ``scales`` /
    ``g_idx`` stacked as a merged projection's would be, then uint8 codes ``[E, N, K]`` with fp32 scales and offsets
    ``[E, K / group, N]`` for the fused MoE kernel's 8-bit experts."""

    def __init__(self, config: GPTQInt8Config, prefix: str = "") -> None:
        super().__init__(config)
        self.prefix = prefix

    def create_weights(self, block: nn.Module) -> bool:
        if self.dynamic_check is not None:
            self.dynamic_check[0].check_uniform_experts(self.dynamic_check[1], block.num_experts)
        experts = block.num_experts
        for param, rows, k, group, parts in self._projections(block):
            grouped = k * self.config.tp_size if self._all_groups(param) else k
            if grouped % group or k % PACK or rows % PACK or k % 16:
                raise ValueError(f"GPTQ 8-bit: an expert's {param} (input size {k}, {rows} outputs) does not fit "
                                 f"groups of {group}, the packing of {PACK} codes an int32 and the 8-bit experts' "
                                 "16-input steps.")
            out = experts * rows
            new_parameter(block, f"{param}_qweight", (k // PACK, out), torch.int32, output_dim=1,
                          dummy_fill=_fill_random_int32)
            new_parameter(block, f"{param}_qzeros", (grouped // group, out // PACK), torch.int32, output_dim=1,
                          pack_factor=PACK, dummy_fill=_fill_random_int32)
            new_parameter(block, f"{param}_scales", (grouped // group, out), torch.get_default_dtype(), output_dim=1,
                          dummy_fill=_fill_scales)
            new_parameter(block, f"{param}_g_idx", (experts * parts, k), torch.int32, output_dim=0,
                          pack_factor=out // (experts * parts), dummy_fill=natural_groups(group, k))
        return True

    def process_weights_after_loading(self, block: nn.Module) -> None:
        experts = block.num_experts
        for param, rows, k, group, parts in self._projections(block):
            qweight, qzeros = getattr(block, f"{param}_qweight").data, getattr(block, f"{param}_qzeros").data
            scales, g_idx = getattr(block, f"{param}_scales").data.float(), getattr(block, f"{param}_g_idx").data
            zeros = unpack_int8_columns(qzeros) + self.config.zero_offset  # v1 stores zero - 1 (sym: 127, so 128)
            regroup = self._all_groups(param)  # a rank's share of act-order down rows: equal groups of 32, padded
            perms = None if regroup else self.act_orders(g_idx, param, k, group, parts)  # rows sorted by group
            total = regrouped_expert_rows(g_idx, scales.shape[0]) if regroup else k
            codes = torch.empty(experts, rows, total, dtype=torch.uint8, device=qweight.device)
            scale = scales.new_empty(experts, total // (32 if regroup else group), rows)
            offsets = torch.empty_like(scale)
            if regroup:
                perms = torch.empty(experts, total, dtype=torch.long, device=qweight.device)
            for e in range(experts):  # one expert at a time: the unpacked int64 codes stay small
                cols = slice(e * rows, (e + 1) * rows)
                q = unpack_int8_rows(qweight[:, cols])  # [K, rows]
                z, s = zeros[:, cols], scales[:, cols]
                if regroup:
                    q, z, s, perms[e] = regroup_expert_rows(q, z, s, g_idx[e], total)
                elif perms is not None:
                    q = q[perms[e]]
                codes[e] = q.t().to(torch.uint8)
                scale[e], offsets[e] = s, -z.float() * s
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                delattr(block, f"{param}_{name}")
            replace_parameter(block, param, codes)
            replace_parameter(block, f"{param}_scale", scale)
            replace_parameter(block, f"{param}_offsets", offsets)
            setattr(block, f"{param}_perm", None if perms is None else perms.to(torch.int32).contiguous())
            setattr(block, f"{param}_group", 32 if regroup else group)

    def experts(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, ExpertQuant]:
        return block.w13, block.w2, ExpertQuant(block.w13_scale, block.w2_scale, w13_group=block.w13_group,
                                                w2_group=block.w2_group,
                                                w13_offsets=block.w13_offsets, w2_offsets=block.w2_offsets,
                                                w13_int8=True, w2_int8=True, w13_perm=block.w13_perm,
                                                w2_perm=block.w2_perm)
