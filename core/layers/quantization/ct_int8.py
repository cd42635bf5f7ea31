"""compressed-tensors 8-bit integer weights (llm-compressor's W8A16 and W8A8 int8 releases, e.g. RedHatAI's
``quantized.w8a16`` / ``quantized.w8a8``), run w8a16 on ``kernels/int8_gemm.py`` (dense) and the fused MoE kernel's
8-bit experts.

Checkpoint layouts (symmetric: ``W[n, k] = q[n, k] * scale[n, g]``, ``g`` the group of input ``k``; per channel: one
group over every input):

- ``pack-quantized`` (W8A16): ``weight_packed`` int32 ``[out, in / 4]`` (byte ``i`` of word ``j`` = input ``4j + i``,
  stored as ``q + 128``), ``weight_scale`` ``[out, groups]``, ``weight_shape`` (dropped), and with group act-order
  ``weight_g_idx`` ``[in]``.
- ``int-quantized`` (W8A8, or W8A16 saved unpacked): ``weight`` int8 ``[out, in]``, ``weight_scale`` ``[out,
  groups]``, and ``weight_zero_point`` (all zero for symmetric weights: checked, dropped).

W8A8 checkpoints also quantize the activations to int8 (per token at run time, or with a static ``input_scale``);
here they stay 16-bit, as this engine runs every integer-weight format (w8a16: more exact than int8 activations, the
same weights; ``input_scale`` / ``input_zero_point`` are read and dropped, logged once). Asymmetric weights fail at
startup naming them.

The layer holds int8 codes ``[out, in]`` and fp32 scales ``[out, groups]`` (per channel ``[out]``); act-order layers
have their input rows sorted by group and gather x's columns by that permutation, and a tensor-parallel rank's share
of an act-order row-parallel layer's inputs is regrouped into padded groups of 32 (``regroup_expert_rows``), as the
GPTQ layers are. A MoE block's experts stack each expert's tensors as a merged projection's, then become the 8-bit
experts' int8 codes ``[E, N, K]`` with scales ``[E, K / group, N]`` (``kernels/fused_moe.py: ExpertQuant``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from core.layers.quantization.base import LinearMethod, new_parameter, replace_parameter
from core.layers.quantization.gptq_bytes import unpack_columns
from core.layers.quantization.int4 import (CompressedTensorsInt4Config, Int4MoEMethod, _fill_random_int32,
                                           _fill_scales, natural_groups, regrouped_expert_rows, rows_in_group_order)
from kernels.fused_moe import ExpertQuant
from kernels.int8_gemm import int8_linear

logger = logging.getLogger(__name__)

PACK = 4  # 8-bit values per int32 in pack-quantized
FORMATS = ("pack-quantized", "int-quantized")
# Tensors a W8A8 / int-quantized checkpoint carries that the w8a16 layers do not use
_DROPPED = (".weight_shape", ".input_scale", ".input_zero_point")


def _fill_int8(tensor: torch.Tensor, gen: torch.Generator) -> None:
    tensor.copy_(torch.randint(-127, 128, tensor.shape, dtype=torch.int8, generator=gen))


class CompressedTensorsInt8Config(CompressedTensorsInt4Config):
    """compressed-tensors 8-bit integer weights (module docstring): the int4 config's tensor names and
    tensor-parallel cuts (``_Int4Config.shard_tensor`` with four codes an int32), layers and experts of its own."""

    pack = PACK

    def __init__(self, *, group_size: int, desc_act: bool = False, skipped: Sequence[str] = (),
                 packed: bool = True, activations: str | None = None) -> None:  # fmt: skip
        super().__init__(group_size=group_size, zero_point=False, desc_act=desc_act, skipped=skipped)
        self.packed = packed  # pack-quantized ``weight_packed``, else int-quantized ``weight``
        self.activations = activations  # the checkpoint's activation scheme, run as 16-bit (module docstring)

    @classmethod
    def from_ct(cls, qc: dict[str, Any], group: dict[str, Any]) -> CompressedTensorsInt8Config:
        from core.layers.quantization.compressed_tensors import integer_scheme

        acts, problems = group.get("input_activations"), []
        if acts is not None and (acts.get("type", "int") != "int" or acts.get("num_bits") != 8):
            problems.append("activations other than 8-bit integers (supported: 16-bit activations, W8A16, or int8 "
                            "activations, W8A8, run as W8A16)")
        size, actorder = integer_scheme(qc, group, FORMATS, "channel", problems)
        activations = None if acts is None else ("dynamic" if acts.get("dynamic", True) else "static")
        if activations is not None:
            logger.info("compressed-tensors W8A8: int8 weights run with 16-bit activations (w8a16); the checkpoint's "
                        "%s activation quantization is not applied.", activations)
        return cls(group_size=size, desc_act=actorder, skipped=qc.get("ignore") or (),
                   packed=str(qc.get("format", FORMATS[0])) == "pack-quantized", activations=activations)

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The stream without the tensors the layers do not hold; a ``weight_zero_point`` must be all zero (the
        weights are symmetric)."""
        for name, tensor in weights:
            if name.endswith(".weight_zero_point"):
                if torch.count_nonzero(tensor):
                    raise ValueError(f"compressed-tensors: {name} holds non-zero zero points, but the scheme says "
                                     "symmetric weights; asymmetric 8-bit weights are not supported.")
                continue
            if not name.endswith(_DROPPED):
                yield name, tensor

    def linear_method(self, prefix: str) -> LinearMethod | None:
        if self.is_skipped(prefix):
            return None
        return CompressedTensorsInt8LinearMethod(self, self.input_shards(prefix))

    def moe_method(self, prefix: str) -> CompressedTensorsInt8MoEMethod | None:
        return None if self.is_skipped(f"{prefix}.experts") else CompressedTensorsInt8MoEMethod(self)

    def summary(self) -> str:
        size = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        kind = "W8A8 run as W8A16" if self.activations else "W8A16"
        return f"compressed-tensors int8 ({kind}, {size}, symmetric{', group act-order' if self.desc_act else ''})"


def _int8_codes_name(prefix: str) -> str:
    """Where an ``int-quantized`` layer's ``weight`` loads: ``weight``, or a MoE block's stack itself (``w13`` /
    ``w2``: an expert's ``weight`` lands on the stack, as a 16-bit one does)."""
    return prefix.removesuffix("_") if prefix else "weight"


def register_int8_layout(holder: nn.Module, prefix: str, config: CompressedTensorsInt8Config, out: int,
                         in_features: int, groups: int, dtype: torch.dtype, g_idx_units: int = 0) -> None:  # fmt: skip
    """The parameters ``{prefix}...`` the checkpoint fills for ``out`` output rows (merged parts, or every expert's
    stacked) of ``in_features`` inputs in ``groups`` groups; ``g_idx_units``: one act order per that many parts of
    ``out`` (experts), ``[g_idx_units, in_features]``."""
    if config.packed:
        new_parameter(holder, f"{prefix}weight_packed", (out, in_features // PACK), torch.int32,
                      dummy_fill=_fill_random_int32)
    else:
        new_parameter(holder, _int8_codes_name(prefix), (out, in_features), torch.int8, dummy_fill=_fill_int8)
    new_parameter(holder, f"{prefix}weight_scale", (out, groups), dtype, dummy_fill=_fill_scales)
    if config.desc_act:
        group = in_features if config.group_size == -1 else config.group_size
        fill = natural_groups(group, in_features)
        if g_idx_units:
            new_parameter(holder, f"{prefix}weight_g_idx", (g_idx_units, in_features), torch.int32, output_dim=0,
                          pack_factor=out // g_idx_units, dummy_fill=fill)
        else:
            new_parameter(holder, f"{prefix}weight_g_idx", (in_features,), torch.int32, output_dim=None,
                          dummy_fill=fill)


def take_int8_codes(holder: nn.Module, prefix: str, config: CompressedTensorsInt8Config
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """What :func:`register_int8_layout`'s parameters loaded, the parameters dropped: signed codes ``[out, in]``
    (int32), fp32 scales ``[out, groups]`` and the input rows' groups (None without act order)."""
    if config.packed:
        q = unpack_columns(getattr(holder, f"{prefix}weight_packed").data, 8) - 128
        delattr(holder, f"{prefix}weight_packed")
    else:
        q = getattr(holder, _int8_codes_name(prefix)).data.to(torch.int32)
        delattr(holder, _int8_codes_name(prefix))
    scales = getattr(holder, f"{prefix}weight_scale").data.float()
    delattr(holder, f"{prefix}weight_scale")
    g_idx = None
    if hasattr(holder, f"{prefix}weight_g_idx"):
        g_idx = getattr(holder, f"{prefix}weight_g_idx").data.long()
        delattr(holder, f"{prefix}weight_g_idx")
    return q, scales, g_idx


def ordered(q: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, group: int, total: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:  # fmt: skip
    """One weight's codes ``q [N, K]`` and scales ``[N, groups]`` in the kernels' order (``rows_in_group_order``:
    symmetric, so a padding row's code 0 weighs exactly 0): the codes, scales, x's column permutation and group."""
    zeros = torch.zeros_like(scales.t(), dtype=q.dtype)
    q_t, _, s, perm, group = rows_in_group_order(q.t(), zeros, scales.t(), g_idx, group, "compressed-tensors", total)
    return q_t.t(), s.t(), perm, group


class CompressedTensorsInt8LinearMethod(LinearMethod):
    """The layer's compressed-tensors tensors as loaded, then int8 codes ``[out, in]`` with fp32 scales (module
    docstring), multiplied by ``kernels/int8_gemm.py``."""

    def __init__(self, config: CompressedTensorsInt8Config, input_shards: int = 1) -> None:
        self.config, self.input_shards = config, input_shards  # ranks sharing the layer's input features

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:  # fmt: skip
        group = in_features if self.config.group_size == -1 else self.config.group_size
        # Act-order's row-parallel layers hold every group's scales: their rows need not fill whole groups
        all_groups = self.config.desc_act and self.config.group_size != -1 and self.input_shards > 1
        grouped = in_features * self.input_shards if all_groups else in_features
        if grouped % group or in_features % PACK:
            described = in_features if self.input_shards == 1 else (f"{in_features} (this rank's share of "
                                                                    f"{in_features * self.input_shards})")
            raise ValueError(f"compressed-tensors int8: a layer's input size {described} must be a multiple of the "
                             f"group size {group} and of {PACK}.")
        layer.group_size = group
        register_int8_layout(layer, "", self.config, sum(output_sizes), in_features, grouped // group, params_dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, scales, g_idx = take_int8_codes(layer, "", self.config)
        q, scales, layer.perm, layer.group_size = ordered(q, scales, g_idx, layer.group_size)
        replace_parameter(layer, "weight", q.to(torch.int8).contiguous())
        per_channel = self.config.group_size == -1
        replace_parameter(layer, "weight_scale", (scales[:, 0] if per_channel else scales).contiguous())
        layer.scale_group = 0 if per_channel else layer.group_size  # int8_linear's: 0 is one scale a row

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.perm is not None:
            x = x[..., layer.perm]
        return int8_linear(x, layer.weight, layer.weight_scale, bias, group=layer.scale_group, backend=layer.backend)


class CompressedTensorsInt8MoEMethod(Int4MoEMethod):
    """A MoE block's compressed-tensors 8-bit experts: each expert's tensors stacked as a merged projection's would
    be, then int8 codes ``[E, N, K]`` with fp32 scales ``[E, K / group, N]`` for the fused MoE kernel's 8-bit experts
    (act order: each expert's rows sorted by group, its permutation read by the kernel; under tensor parallelism an
    act-order down projection regrouped into padded groups of 32)."""

    config: CompressedTensorsInt8Config

    def create_weights(self, block: nn.Module) -> bool:
        experts = block.num_experts
        for param, rows, k, group, parts in self._projections(block):
            grouped = k * self.config.tp_size if self._all_groups(param) else k
            if grouped % group or k % 16 or k % PACK:
                raise ValueError(f"compressed-tensors int8: an expert's {param} (input size {k}) does not fit groups "
                                 f"of {group} and the 8-bit experts' 16-input steps.")
            register_int8_layout(block, f"{param}_", self.config, experts * rows, k, grouped // group,
                                 torch.get_default_dtype(), g_idx_units=experts * parts)
        return True

    def process_weights_after_loading(self, block: nn.Module) -> None:
        experts = block.num_experts
        for param, rows, k, group, parts in self._projections(block):
            q, scales, g_idx = take_int8_codes(block, f"{param}_", self.config)  # [E * rows, K], [E * rows, G]
            if g_idx is not None:
                g_idx = self.expert_g_idx(g_idx, parts, k)  # [E, K]
            total = regrouped_expert_rows(g_idx, scales.shape[1]) if self._all_groups(param) else 0
            sorted_experts = [ordered(q[e * rows: (e + 1) * rows], scales[e * rows: (e + 1) * rows],
                                      None if g_idx is None else g_idx[e], group, total)
                              for e in range(experts)]  # fmt: skip
            codes = torch.stack([qe.to(torch.int8) for qe, _, _, _ in sorted_experts])  # [E, rows, K']
            scale = torch.stack([se.t() for _, se, _, _ in sorted_experts]).contiguous()  # [E, groups', rows]
            perms = None
            if any(pe is not None for _, _, pe, _ in sorted_experts):  # an expert already in order: the identity
                in_order = torch.arange(codes.shape[2], dtype=torch.int32, device=codes.device)
                perms = torch.stack([in_order if pe is None else pe.to(torch.int32) for _, _, pe, _ in sorted_experts])
            replace_parameter(block, param, codes)
            replace_parameter(block, f"{param}_scale", scale)
            setattr(block, f"{param}_perm", perms)
            setattr(block, f"{param}_group", sorted_experts[0][3])

    def experts(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, ExpertQuant]:
        return block.w13, block.w2, ExpertQuant(block.w13_scale, block.w2_scale, w13_group=block.w13_group,
                                                w2_group=block.w2_group, w13_int8=True, w2_int8=True,
                                                w13_perm=block.w13_perm, w2_perm=block.w2_perm)
