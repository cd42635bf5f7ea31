"""NVFP4 checkpoints (NVIDIA ModelOpt ``quant_algo: NVFP4`` or ``W4A16_NVFP4``, compressed-tensors
``nvfp4-pack-quantized``; e.g. the nvidia/*-FP4 and RedHatAI NVFP4 releases), run w4a16 on the 4-bit codebook kernels
(``kernels/bnb4_gemm.py``, the fused MoE kernel's ``bnb4`` experts).

Each weight is an e2m1 code (two a byte, the low nibble first) times its block of 16's fp8 e4m3 scale and a global fp32
scale of the tensor: ModelOpt ``weight`` / ``weight_scale`` / ``weight_scale_2`` with ``W = e2m1 * s * s2``;
compressed-tensors ``weight_packed`` / ``weight_scale`` / ``weight_global_scale`` with ``W = e2m1 * s / g``. That is the
bitsandbytes form with the e2m1 values as the codebook, the fp8 ``s`` as each block's absmax and ``s2`` (or ``1 / g``) a
per-row scale of the product (the global scale factors out of the K sum): after loading only the nibbles are swapped
into that kernel's order, so the layer holds the file's 4.5 bits a weight. The checkpoints' fp4 activation scales (W4A4:
the activations are quantized too on Blackwell GPUs) are read and dropped: the activations stay 16-bit, as vLLM runs
NVFP4 on GPUs without fp4 tensor cores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from core.layers.quantization.base import (LinearMethod, QuantConfig, module_listed, new_parameter, plain_shard,
                                           replace_parameter, shard_starts, whole_units)
from core.layers.quantization.fp8 import Fp8MoEMethod, modelopt_excluded
from core.layers.quantization.bnb import codebook_linear
from kernels.bnb4_gemm import E2M1_CODEBOOK
from kernels.fused_moe import ExpertQuant

logger = logging.getLogger(__name__)

BLOCK = 16  # weights per fp8 scale
FP8 = torch.float8_e4m3fn
# Tensors the w4a16 layers do not hold: the fp4 activations' scales, and per-layer metadata
_DROPPED = (".input_scale", ".input_global_scale", ".weight_shape")


class Nvfp4Config(QuantConfig):
    """``layout``: ``modelopt`` (``weight`` codes, ``weight_scale_2`` multiplies) or ``ct`` (``weight_packed``,
    ``weight_global_scale`` divides); ``ignored``: modules left 16-bit (names, ``re:`` patterns)."""

    name = "nvfp4"

    def __init__(self, *, layout: str, ignored: Sequence[str] = ()) -> None:
        self.layout = layout
        self.ignored = tuple(ignored)
        self.quantized_lm_head = not self.is_ignored("lm_head")  # both formats target every Linear by default

    @classmethod
    def from_hf(cls, quantization_config: dict[str, Any]) -> Nvfp4Config:
        raise ValueError("NVFP4 is read from a ModelOpt (quant_method: modelopt) or compressed-tensors checkpoint.")

    @classmethod
    def from_modelopt(cls, qc: dict[str, Any]) -> Nvfp4Config:
        group = int(qc.get("group_size", BLOCK))
        if group != BLOCK:
            raise ValueError(f"ModelOpt NVFP4 group_size {group} is not supported; supported: {BLOCK}.")
        ignored = modelopt_excluded(qc)
        if str(qc.get("quant_algo")).upper() == "NVFP4":  # W4A4; W4A16_NVFP4 is w4a16 as written
            _log_w4a16("ModelOpt NVFP4")
        return cls(layout="modelopt", ignored=ignored)

    @classmethod
    def from_ct(cls, qc: dict[str, Any], group: dict[str, Any]) -> Nvfp4Config:
        weights, acts = group.get("weights") or {}, group.get("input_activations")
        fmt = str(qc.get("format", "nvfp4-pack-quantized"))
        problems = []
        if fmt != "nvfp4-pack-quantized":
            problems.append(f"format {fmt!r} (supported: nvfp4-pack-quantized)")
        group_size = int(weights.get("group_size") or BLOCK)
        if weights.get("strategy", "tensor_group") != "tensor_group" or group_size != BLOCK:
            problems.append(f"strategy {weights.get('strategy')!r} with group_size {weights.get('group_size')} "
                            f"(supported: tensor_group, {BLOCK})")
        if not weights.get("symmetric", True):
            problems.append("asymmetric weights (supported: symmetric)")
        if acts is not None and (acts.get("type") != "float" or acts.get("num_bits") != 4):
            problems.append("activations other than fp4 (supported: NVFP4 W4A4 run as W4A16, or W4A16)")
        if problems:
            raise ValueError(f"compressed-tensors scheme weights={weights}, input_activations={acts} is not "
                             f"supported: {'; '.join(problems)}.")
        if acts is not None:
            _log_w4a16("compressed-tensors NVFP4")
        return cls(layout="ct", ignored=qc.get("ignore") or ())

    def is_ignored(self, prefix: str) -> bool:
        return module_listed(self.ignored, prefix)

    @property
    def codes_name(self) -> str:
        return "weight" if self.layout == "modelopt" else "weight_packed"

    @property
    def global_name(self) -> str:
        return "weight_scale_2" if self.layout == "modelopt" else "weight_global_scale"

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        return ((name, tensor) for name, tensor in weights if not name.endswith(_DROPPED))

    def linear_method(self, prefix: str) -> LinearMethod | None:
        if self.is_ignored(self.global_prefix(prefix)):
            return None
        return Nvfp4LinearMethod(self)

    def moe_method(self, prefix: str) -> Nvfp4MoEMethod | None:
        return None if self.is_ignored(f"{self.global_prefix(prefix)}.experts") else Nvfp4MoEMethod(self)

    def shard_tensor(self, name: str, tensor: torch.Tensor, parallel: str, start: int, length: int) -> torch.Tensor:
        """Codes ``[out, in / 2]`` and block scales ``[out, in / 16]`` by output rows, or whole blocks of 16 inputs;
        the global scales are every rank's."""
        suffix = name.rsplit(".", 1)[-1]
        if suffix == self.global_name:
            return tensor
        if suffix not in (self.codes_name, "weight_scale") or tensor.dim() != 2:
            return plain_shard(tensor, parallel, start, length)
        if parallel == "column":
            return tensor.narrow(0, start, length)
        first, count = whole_units("nvfp4", name.rsplit(".", 1)[0], parallel, start, length, BLOCK, "blocks")
        unit = BLOCK // 2 if suffix == self.codes_name else 1  # bytes, or scales, a block
        return tensor.narrow(1, first * unit, count * unit)

    def summary(self) -> str:
        return f"nvfp4 ({self.layout}: e2m1 weights, fp8 scales per {BLOCK}, w4a16)"


def _log_w4a16(kind: str) -> None:
    logger.info("%s: the weights run w4a16 (the e2m1 codes looked up, their scales applied); the checkpoint's fp4 "
                "activation quantization is not applied.", kind)


def _fill_codes(tensor: torch.Tensor, gen: torch.Generator) -> None:
    tensor.copy_(torch.randint(0, 256, tensor.shape, dtype=torch.uint8, generator=gen))


def _fill_fp8_scale(tensor: torch.Tensor, gen: torch.Generator) -> None:
    tensor.copy_(torch.full(tensor.shape, 1.0).to(tensor.dtype))


def _fill_global(tensor: torch.Tensor, gen: torch.Generator) -> None:
    tensor.fill_(1e-3)


def _codes_param(prefix: str, config: Nvfp4Config) -> str:
    """Where a weight's codes load: ``weight`` / ``weight_packed``; a MoE stack's ModelOpt ``weight`` lands on the
    stack itself (``w13``), as a 16-bit expert's does."""
    return prefix.removesuffix("_") if prefix and config.layout == "modelopt" else f"{prefix}{config.codes_name}"


def register_nvfp4(holder: nn.Module, prefix: str, config: Nvfp4Config, sizes: Sequence[int], in_features: int
                   ) -> None:  # fmt: skip
    """The checkpoint's parameters of a weight of ``sizes`` output rows per shard (a merged projection's parts, or
    every expert's projections): codes, block scales, one global scale per shard."""
    if in_features % BLOCK:
        raise ValueError(f"nvfp4: an input size of {in_features} is not whole blocks of {BLOCK}.")
    out = sum(sizes)
    new_parameter(holder, _codes_param(prefix, config), (out, in_features // 2), torch.uint8, dummy_fill=_fill_codes)
    new_parameter(holder, f"{prefix}weight_scale", (out, in_features // BLOCK), FP8, dummy_fill=_fill_fp8_scale)
    new_parameter(holder, f"{prefix}{config.global_name}", (len(sizes),), torch.float32,
                  shard_offsets=shard_starts(sizes), dummy_fill=_fill_global)


def take_nvfp4(holder: nn.Module, prefix: str, config: Nvfp4Config, sizes: Sequence[int]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """What :func:`register_nvfp4`'s parameters loaded, dropped: the codes in the codebook kernels' nibble order
    (high first) ``[out, in / 2]``, the fp8 block scales ``[out, in / 16]`` as they are and each output row's global
    scale ``[out]`` (its shard's: ModelOpt's ``weight_scale_2``, compressed-tensors' ``1 / weight_global_scale``)."""
    codes_name = _codes_param(prefix, config)
    packed = getattr(holder, codes_name).data
    codes = ((packed & 15) << 4) | (packed >> 4)  # the file's low nibble first -> the kernels' high nibble first
    scale = getattr(holder, f"{prefix}weight_scale").data
    glob = getattr(holder, f"{prefix}{config.global_name}").data.float()
    per_row = glob.repeat_interleave(torch.tensor(tuple(sizes), device=glob.device))
    for name in (codes_name, f"{prefix}weight_scale", f"{prefix}{config.global_name}"):
        delattr(holder, name)
    return codes, scale.contiguous(), (per_row if config.layout == "modelopt" else 1.0 / per_row).contiguous()


class Nvfp4LinearMethod(LinearMethod):
    """The layer's NVFP4 tensors as loaded, then its codes in the kernels' nibble order, the fp8 block scales, each
    row's global scale and the e2m1 codebook for ``kernels/bnb4_gemm.py`` (module docstring)."""

    def __init__(self, config: Nvfp4Config) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:  # fmt: skip
        layer.output_sizes = tuple(output_sizes)
        register_nvfp4(layer, "", self.config, output_sizes, in_features)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        codes, scale, row_scale = take_nvfp4(layer, "", self.config, layer.output_sizes)
        replace_parameter(layer, "weight", codes)
        replace_parameter(layer, "weight_scale", scale)
        replace_parameter(layer, "weight_row_scale", row_scale)
        replace_parameter(layer, "weight_quant_map", torch.tensor(E2M1_CODEBOOK, device=codes.device))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return codebook_linear(layer, x, layer.weight_scale, BLOCK, bias, layer.weight_row_scale)


class Nvfp4MoEMethod:
    """A MoE block's NVFP4 experts: each expert's tensors stacked as a merged projection's (``w13``: every expert's
    gate then up rows; one global scale per expert and projection), then the fused MoE kernel's 4-bit codebook
    experts with the e2m1 codebook and blocks of 16."""

    def __init__(self, config: Nvfp4Config) -> None:
        self.config = config

    _projections = staticmethod(Fp8MoEMethod._projections)  # per-shard rows: the fp8 experts' per-tensor scales'

    def create_weights(self, block: nn.Module) -> bool:
        for name, sizes, k in self._projections(block):
            if k % 32:
                raise ValueError(f"nvfp4: an expert's {name} input size {k} (this rank's, under tensor parallelism) "
                                 "is not a multiple of the experts' kernel's 32-input steps.")
            register_nvfp4(block, f"{name}_", self.config, sizes, k)
        return True

    def process_weights_after_loading(self, block: nn.Module) -> None:
        for name, sizes, _ in self._projections(block):
            codes, scale, row_scale = take_nvfp4(block, f"{name}_", self.config, sizes)
            replace_parameter(block, name, codes)
            replace_parameter(block, f"{name}_weight_scale", scale)
            replace_parameter(block, f"{name}_row_scale", row_scale)
        replace_parameter(block, "codebook", torch.tensor(E2M1_CODEBOOK, device=block.w13.device))

    def experts(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, ExpertQuant]:
        e, inter, hidden = block.num_experts, block.inter, block.hidden
        return (block.w13.view(e, 2 * inter, -1), block.w2.view(e, hidden, -1),
                ExpertQuant(block.w13_weight_scale.view(e, 2 * inter, -1), block.w2_weight_scale.view(e, hidden, -1),
                            codebook=block.codebook, bnb_block=BLOCK, w13_row_scale=block.w13_row_scale.view(e, -1),
                            w2_row_scale=block.w2_row_scale.view(e, -1)))
