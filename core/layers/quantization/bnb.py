"""bitsandbytes 4-bit weights (``load_in_4bit`` checkpoints as transformers saves them, NF4 or FP4, with or without
double quantization), and ``--quantization bitsandbytes`` on a 16-bit checkpoint (NF4 at load, as vLLM does).

A checkpoint holds, per linear layer: ``weight`` (uint8 ``[out * in / 2, 1]``: the row-major codes, two a byte),
``weight.absmax`` (one per block of 64 weights: fp32, or with double quantization uint8 codes into
``weight.nested_quant_map`` times ``weight.nested_absmax`` per 256 blocks plus the state's ``nested_offset``),
``weight.quant_map`` (the 16-value codebook) and ``weight.quant_state.bitsandbytes__nf4`` (a JSON blob: shape, block
size, offset). :meth:`BitsAndBytesConfig.checkpoint_tensors` turns each layer's group into what the layer holds:
``weight`` ``[out, in / 2]``, ``weight_absmax`` fp32 ``[out, in / 64]`` and ``weight_quant_map``
(``kernels/bnb4_gemm.py`` multiplies them).

8-bit (LLM.int8, ``load_in_8bit``) checkpoints hold ``weight`` (int8 ``[out, in]``, ``round(127 * W / absmax)``),
``SCB`` (each row's absmax) and ``weight_format`` (0: row-major, the only layout bitsandbytes still writes); the
layer holds ``weight`` and ``weight_scale = SCB / 127`` and runs ``kernels/int8_gemm.py`` (w8a16: the activations
stay unquantized, so LLM.int8's outlier threshold has nothing to split off). A MoE block's 8-bit experts
(``BitsAndBytes8bitMoEMethod``) stack each expert's int8 rows and scales and run on the fused MoE kernel's 8-bit
experts (a scale per output channel); its router, which ``load_in_8bit`` quantizes like any Linear, is dequantized
at load and stays a 16-bit Linear.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from core.layers.quantization.base import (LinearMethod, QuantConfig, module_listed, new_parameter, plain_shard,
                                           replace_parameter)
from kernels.bnb4_gemm import NF4_CODEBOOK, bnb4_linear, dequantize_bnb4, quantize_bnb4
from kernels.fused_moe import ExpertQuant
from kernels.int8_gemm import int8_linear

BLOCKSIZE = 64  # transformers' (and vLLM's) 4-bit block; a checkpoint of another fails at load naming it
# MoE routers and Qwen2-MoE's shared-expert gate, which transformers' load_in_4bit quantizes like any Linear
_ROUTER = re.compile(r"\.(mlp|block_sparse_moe)\.(gate|shared_expert_gate)$")
_STATE = ".weight.quant_state.bitsandbytes__"
_PARTS = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")


class BitsAndBytesConfig(QuantConfig):
    name = "bitsandbytes"

    def __init__(self, *, serialized: bool, quant_type: str = "nf4", skipped: Sequence[str] = (), bits: int = 4
                 ) -> None:  # fmt: skip
        self.serialized = serialized  # False: a 16-bit checkpoint quantized to NF4 at load
        self.quant_type = quant_type
        self.skipped = tuple(skipped)
        self.bits = bits

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> BitsAndBytesConfig:
        skipped = qc.get("llm_int8_skip_modules") or ()
        if qc.get("load_in_8bit", qc.get("_load_in_8bit", False)):
            return cls(serialized=True, quant_type="int8", skipped=skipped, bits=8)
        if not qc.get("load_in_4bit", qc.get("_load_in_4bit", False)):
            raise ValueError("bitsandbytes quantization_config without load_in_4bit or load_in_8bit; supported: "
                             "4-bit (NF4, FP4) and 8-bit (LLM.int8) checkpoints.")
        quant_type = str(qc.get("bnb_4bit_quant_type", "fp4")).lower()
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bitsandbytes bnb_4bit_quant_type {quant_type!r} is not supported; supported: nf4, fp4.")
        return cls(serialized=True, quant_type=quant_type, skipped=skipped)

    @classmethod
    def online(cls) -> BitsAndBytesConfig:
        return cls(serialized=False)

    def linear_method(self, prefix: str) -> LinearMethod | None:
        if module_listed(self.skipped, self.global_prefix(prefix)):
            return None
        return BitsAndBytes8bitLinearMethod() if self.bits == 8 else BitsAndBytesLinearMethod(self)

    def moe_method(self, prefix: str) -> BitsAndBytesMoEMethod | BitsAndBytes8bitMoEMethod | None:
        if module_listed(self.skipped, f"{self.global_prefix(prefix)}.experts"):
            return None
        if self.bits == 8:
            return BitsAndBytes8bitMoEMethod()
        return BitsAndBytesMoEMethod(self)

    def shard_tensor(self, name: str, tensor: torch.Tensor, parallel: str, start: int, length: int) -> torch.Tensor:
        """The layer's tensors as :meth:`checkpoint_tensors` made them (double quantization undone, so a rank's rows
        or blocks of inputs stand alone): codes two a byte and block absmax cut by rows or whole blocks."""
        if self.bits == 8:  # int8 [out, in] cut like a 16-bit weight; the row scales go with the rows
            if name.endswith(".weight_scale"):
                return tensor.narrow(0, start, length) if parallel == "column" else tensor
            return plain_shard(tensor, parallel, start, length)
        codes = name.endswith(".weight") and tensor.dtype == torch.uint8
        if not (codes or name.endswith(".weight_absmax")):
            return tensor if name.endswith(".weight_quant_map") else plain_shard(tensor, parallel, start, length)
        if parallel == "column":
            return tensor.narrow(0, start, length)
        if start % BLOCKSIZE or length % BLOCKSIZE:
            raise ValueError(f"bitsandbytes: {name.rsplit('.', 1)[0]} cannot be split over the ranks: each rank's "
                             f"{length} input features (from {start}) are not whole {BLOCKSIZE}-weight blocks.")
        unit = 2 if codes else BLOCKSIZE
        return tensor.narrow(1, start // unit, length // unit)

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each quantized layer's tensors, gathered until its quant state arrives, as the layer holds them; other
        tensors pass as they come."""
        if self.bits == 8:
            yield from _int8_tensors(weights)
            return
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights:
            layer = next((name.removesuffix(f".{part}") for part in _PARTS if name.endswith(f".{part}")), None)
            if _STATE in name:
                layer = name.split(_STATE)[0]
                pending.setdefault(layer, {})["state"] = tensor
                yield from _layer_tensors(layer, pending.pop(layer))
            elif layer is not None:
                pending.setdefault(layer, {})[name.removeprefix(f"{layer}.")] = tensor
            elif self.serialized and name.endswith(".weight") and tensor.dtype == torch.uint8:
                pending.setdefault(name.removesuffix(".weight"), {})["weight"] = tensor
            else:
                yield name, tensor
        if pending:
            raise ValueError(f"bitsandbytes: {len(pending)} layers have no quant state (e.g. {next(iter(pending))}); "
                             "the checkpoint is incomplete.")

    def summary(self) -> str:
        if self.bits == 8:
            return "bitsandbytes 8-bit (LLM.int8 weights, run w8a16)"
        return f"bitsandbytes 4-bit {self.quant_type} (block {BLOCKSIZE}{'' if self.serialized else ', at load'})"


def _int8_tensors(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """An 8-bit checkpoint's tensors as the layers hold them: ``SCB`` as ``weight_scale = SCB / 127``, the
    row-major ``weight_format`` checked and dropped; a MoE router's (or shared-expert gate's) int8 rows and ``SCB``
    as its dequantized ``weight``."""
    routers: dict[str, dict[str, torch.Tensor]] = {}  # a quantized router's rows or SCB, until both arrive
    for name, tensor in weights:
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight_format"):
            if int(tensor.reshape(-1)[0]) != 0:
                raise ValueError(f"bitsandbytes: {name} is {int(tensor.reshape(-1)[0])}, a tiled 8-bit layout "
                                 "(col32 / col_turing / col_ampere); supported: 0 (row-major).")
        elif _ROUTER.search(layer) and (name.endswith(".SCB") or tensor.dtype == torch.int8):
            parts = routers.setdefault(layer, {})
            parts[name.rsplit(".", 1)[1]] = tensor
            if len(parts) == 2:
                del routers[layer]
                yield f"{layer}.weight", parts["weight"].float() * (parts["SCB"].float() / 127.0)[:, None]
        elif name.endswith(".SCB"):
            yield f"{name.removesuffix('.SCB')}.weight_scale", tensor.float() / 127.0
        else:
            yield name, tensor
    if routers:
        raise ValueError(f"bitsandbytes: {len(routers)} 8-bit MoE routers lack their int8 weight or SCB (e.g. "
                         f"{next(iter(routers))}); the checkpoint is incomplete.")


def _layer_tensors(layer: str, parts: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """One layer's bitsandbytes tensors as ``weight [out, in / 2]``, ``weight_absmax [out, in / 64]`` (fp32, double
    quantization undone) and ``weight_quant_map``."""
    state = json.loads(bytes(parts["state"].flatten().tolist()).decode())
    if int(state.get("blocksize", BLOCKSIZE)) != BLOCKSIZE:
        raise ValueError(f"bitsandbytes: {layer} has blocks of {state['blocksize']} weights; supported: {BLOCKSIZE}.")
    out, in_features = (int(d) for d in state["shape"])
    absmax = parts["weight.absmax"]
    if "weight.nested_absmax" in parts:  # double quantization: 8-bit codes of the absmax, per 256 blocks
        nested = parts["weight.nested_absmax"].float().repeat_interleave(int(state["nested_blocksize"]))
        absmax = parts["weight.nested_quant_map"].float()[absmax.long()] * nested[: absmax.numel()]
        absmax = absmax + float(state["nested_offset"])
    codes = parts["weight"].reshape(out, in_features // 2)
    absmax = absmax.float().reshape(out, in_features // BLOCKSIZE)
    if _ROUTER.search(layer):  # a MoE router (or shared-expert gate) stays a 16-bit Linear: its weight dequantized
        yield f"{layer}.weight", dequantize_bnb4(codes, absmax, parts["weight.quant_map"].float(), BLOCKSIZE)
        return
    yield f"{layer}.weight", codes
    yield f"{layer}.weight_absmax", absmax
    yield f"{layer}.weight_quant_map", parts["weight.quant_map"].float()


def _fill_codes(tensor: torch.Tensor, gen: torch.Generator) -> None:
    tensor.copy_(torch.randint(0, 256, tensor.shape, dtype=torch.uint8, generator=gen))


def _fill_absmax(tensor: torch.Tensor, gen: torch.Generator) -> None:
    tensor.fill_(1e-2)


def _fill_codebook(tensor: torch.Tensor, gen: torch.Generator) -> None:
    tensor.copy_(torch.tensor(NF4_CODEBOOK))


class BitsAndBytesLinearMethod(LinearMethod):
    """The layer's codes and block absmax, multiplied by ``kernels/bnb4_gemm.py`` (w4a16)."""

    def __init__(self, config: BitsAndBytesConfig) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:  # fmt: skip
        out = sum(output_sizes)
        if in_features % BLOCKSIZE:
            raise ValueError(f"bitsandbytes: a layer's input size {in_features} is not a multiple of the "
                             f"{BLOCKSIZE}-weight blocks.")
        if not self.config.serialized:  # quantized after loading
            new_parameter(layer, "weight", (out, in_features), params_dtype)
            return
        new_parameter(layer, "weight", (out, in_features // 2), torch.uint8, dummy_fill=_fill_codes)
        new_parameter(layer, "weight_absmax", (out, in_features // BLOCKSIZE), torch.float32, dummy_fill=_fill_absmax)
        new_parameter(layer, "weight_quant_map", (16,), torch.float32, output_dim=None, dummy_fill=_fill_codebook)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not self.config.serialized:
            codes, absmax = quantize_bnb4(layer.weight.data, BLOCKSIZE)
            replace_parameter(layer, "weight", codes)
            replace_parameter(layer, "weight_absmax", absmax)
            replace_parameter(layer, "weight_quant_map", torch.tensor(NF4_CODEBOOK, device=codes.device))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return codebook_linear(layer, x, layer.weight_absmax, BLOCKSIZE, bias)


def codebook_linear(layer: nn.Module, x: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                    bias: torch.Tensor | None, row_scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``x @ W^T`` of a layer holding 4-bit codes in ``weight`` and its 16 code values in ``weight_quant_map``, each
    ``blocksize`` weights scaled by their ``absmax`` (and NVFP4's ``row_scale`` per output row)."""
    return bnb4_linear(x, layer.weight, absmax, layer.weight_quant_map, blocksize, bias, backend=layer.backend,
                       row_scale=row_scale)


def _fill_int8(tensor: torch.Tensor, gen: torch.Generator) -> None:
    tensor.copy_(torch.randint(-127, 128, tensor.shape, dtype=torch.int8, generator=gen))


class BitsAndBytes8bitLinearMethod(LinearMethod):
    """The layer's int8 weight and row scales, multiplied by ``kernels/int8_gemm.py`` (w8a16)."""

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:  # fmt: skip
        out = sum(output_sizes)
        new_parameter(layer, "weight", (out, in_features), torch.int8, dummy_fill=_fill_int8)
        new_parameter(layer, "weight_scale", (out,), torch.float32, dummy_fill=_fill_absmax)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_linear(x, layer.weight, layer.weight_scale, bias, backend=layer.backend)


class BitsAndBytesMoEMethod:
    """A MoE block's 4-bit experts: each expert's gate, up and down load as :meth:`BitsAndBytesConfig.
    checkpoint_tensors` made them into stacked ``w13`` uint8 ``[E * 2 * inter, hidden / 2]`` (gate rows then up
    rows of each expert) and ``w2``, with their block absmax and the shared codebook; ``--quantization
    bitsandbytes`` on a 16-bit checkpoint quantizes the block's own experts to NF4 at load. The fused MoE kernel
    looks the codes up (``kernels/fused_moe.py: _moe_bnb4_kernel``)."""

    def __init__(self, config: BitsAndBytesConfig) -> None:
        self.config = config

    @staticmethod
    def _projections(block: nn.Module) -> tuple[tuple[str, int, int], ...]:
        return ("w13", block.num_experts * 2 * block.inter, block.hidden), ("w2", block.num_experts * block.hidden,
                                                                               block.inter)  # fmt: skip

    def create_weights(self, block: nn.Module) -> bool:
        """The checkpoint's codes, absmax and codebook; False (quantized at load): the block's own 16-bit experts."""
        for name, rows, k in self._projections(block):
            if k % BLOCKSIZE:
                raise ValueError(f"bitsandbytes: an expert's input size {k} (this rank's, under tensor parallelism) "
                                 f"is not a multiple of the {BLOCKSIZE}-weight blocks.")
        if not self.config.serialized:
            return False
        for name, rows, k in self._projections(block):
            new_parameter(block, name, (rows, k // 2), torch.uint8, dummy_fill=_fill_codes)
            new_parameter(block, f"{name}_weight_absmax", (rows, k // BLOCKSIZE), torch.float32,
                          dummy_fill=_fill_absmax)
            new_parameter(block, f"{name}_weight_quant_map", (16,), torch.float32, output_dim=None,
                          dummy_fill=_fill_codebook)
        return True

    def process_weights_after_loading(self, block: nn.Module) -> None:
        if self.config.serialized:
            if not torch.equal(block.w13_weight_quant_map, block.w2_weight_quant_map):
                raise ValueError("bitsandbytes: a MoE block's experts use different codebooks; one is supported.")
            return
        for name, _, _ in self._projections(block):
            codes, absmax = quantize_bnb4(getattr(block, name).data, BLOCKSIZE)
            replace_parameter(block, name, codes)
            replace_parameter(block, f"{name}_weight_absmax", absmax)
        codebook = torch.tensor(NF4_CODEBOOK, device=block.w13.device)
        replace_parameter(block, "w13_weight_quant_map", codebook)

    def experts(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, ExpertQuant]:
        e = block.num_experts
        w13, w2 = block.w13.view(e, 2 * block.inter, -1), block.w2.view(e, block.hidden, -1)
        absmax13 = block.w13_weight_absmax.view(e, 2 * block.inter, -1)
        absmax2 = block.w2_weight_absmax.view(e, block.hidden, -1)
        return w13, w2, ExpertQuant(absmax13, absmax2, codebook=block.w13_weight_quant_map, bnb_block=BLOCKSIZE)


class BitsAndBytes8bitMoEMethod:
    """A MoE block's 8-bit experts: each expert's int8 rows and ``weight_scale`` (``SCB / 127``) stacked into ``w13``
    ``[E * 2 * inter, hidden]`` (gate rows then up rows of each expert) / ``w2`` and ``{w13,w2}_weight_scale``; the
    fused MoE kernel's 8-bit experts (``ExpertQuant.w13_int8``) run them with one scale per output channel (group =
    K) and no offsets."""

    _projections = staticmethod(BitsAndBytesMoEMethod._projections)

    def create_weights(self, block: nn.Module) -> bool:
        for name, rows, k in self._projections(block):
            if k % 16:
                raise ValueError(f"bitsandbytes 8-bit: an expert's input size {k} (this rank's, under tensor "
                                 "parallelism) is not a multiple of the 8-bit experts' 16-input steps.")
            new_parameter(block, name, (rows, k), torch.int8, dummy_fill=_fill_int8)
            new_parameter(block, f"{name}_weight_scale", (rows,), torch.float32, dummy_fill=_fill_absmax)
        return True

    def process_weights_after_loading(self, block: nn.Module) -> None:
        pass

    def experts(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, ExpertQuant]:
        e = block.num_experts
        w13, w2 = block.w13.view(e, 2 * block.inter, block.hidden), block.w2.view(e, block.hidden, block.inter)
        scale13 = block.w13_weight_scale.view(e, 1, 2 * block.inter)
        scale2 = block.w2_weight_scale.view(e, 1, block.hidden)
        return w13, w2, ExpertQuant(scale13, scale2, w13_group=block.hidden, w2_group=block.inter, w13_int8=True,
                                    w2_int8=True)
