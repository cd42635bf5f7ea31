"""FP8 W8A8: online (``--quantization fp8`` on a bf16/fp16 checkpoint) and FP8 checkpoints.

Checkpoint layouts read: ``quant_method: fp8`` (AutoFP8 / vLLM: fp8 ``weight``, per-tensor ``weight_scale``,
``input_scale`` when ``activation_scheme: static``) and compressed-tensors float8 (llm-compressor ``FP8`` /
``FP8_DYNAMIC``: ``weight_scale`` per tensor or per channel ``[out, 1]``, ``input_scale`` for static per-tensor
activations), and NVIDIA ModelOpt FP8 (``quant_method: modelopt``, :meth:`Fp8Config.from_modelopt`: per-tensor scales,
static activations). After loading every layer holds an fp8 ``[out, in]`` weight and one fp32 scale per output channel
(per-tensor shard scales of merged q/k/v are spread over their channels, which is exact); a static input scale of a
merged layer is the shards' max, as in vLLM. The matmul is ``kernels/fp8_linear.py``: W8A8 through ``torch._scaled_mm``
for more than 16 rows; decode-sized inputs keep their activations unquantized (the skinny w8a16 kernel reads the same
fp8 weights), so a static ``input_scale`` applies to the W8A8 path only. compressed-tensors FP8 W8A16 (float8 weights
per tensor or channel, no activation scheme) keeps its activations 16-bit: a scale per output row, run by the block
kernel (``kernels/fp8_block_gemm.py``) with blocks of one row by every input.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from core.layers.quantization.base import (LinearMethod, QuantConfig, new_parameter, plain_shard, replace_parameter,
                                           shard_starts)
from kernels.fp8_block_gemm import fp8_block_linear
from kernels.fp8_linear import (
    FP8_DTYPE,
    Fp8Activations,
    NormedRows,
    fp8_gate_up_silu,
    fp8_linear,
    fp8_linear_ref,
    fp8_qkv_rope_cache,
    fp8_supported,
    norm_prologue_configured,
    quantize_per_channel,
)
from kernels.fp8_mlp_gluon import (MlpHalfConfig, gluon_fp8_mlp_half, mlp_half_config, mlp_half_configured,
                                   mlp_half_supported)
from kernels.fused_moe import ExpertQuant

logger = logging.getLogger(__name__)


class Fp8Config(QuantConfig):
    name = "fp8"

    def __init__(self, *, serialized: bool, weight_strategy: str = "channel", static_activations: bool = False,
                 ignored: Sequence[str] = (), block: tuple[int, int] | None = None,
                 block_scale_name: str = "weight_scale_inv", weight_only: bool = False,
                 modelopt_scales: bool = False, e8m0_scales: bool = False) -> None:  # fmt: skip
        """``serialized``: the checkpoint holds fp8 weights (else they are quantized at load); ``weight_strategy``:
        ``tensor`` (one scale per tensor), ``channel`` or ``block`` (one per ``block = (rows, columns)`` of the
        weight, in the checkpoint tensor ``block_scale_name``; run w8a16, ``kernels/fp8_block_gemm.py``);
        ``static_activations``: the checkpoint's ``input_scale`` is used instead of per-token dynamic scales;
        ``ignored``: layers left unquantized (names or ``re:``); ``weight_only``: a W8A16 checkpoint (compressed-tensors
        fp8 weights per tensor or channel, activations left 16-bit), run w8a16 on the block kernel with a scale per
        output row (a block of one row by every input); ``modelopt_scales``: ModelOpt's scale shapes, ``[out]`` per
        channel and ``[out / block, 1, in / block, 1]`` per block (else ``[out, 1]`` and ``[out / block, in /
        block]``); ``e8m0_scales``: block scales stored as E8M0 exponents (uint8 ``e``: ``2 ** (e - 127)``, MXFP8)."""
        self.serialized = serialized
        self.weight_only = weight_only
        self.weight_strategy = weight_strategy
        self.static_activations = static_activations
        self.ignored = tuple(ignored)
        self.block = block
        self.block_scale_name = block_scale_name
        self.modelopt_scales = modelopt_scales
        self.e8m0_scales = e8m0_scales

    @classmethod
    def online(cls) -> Fp8Config:
        return cls(serialized=False)

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> Fp8Config:
        method = str(qc.get("quant_method", "fp8")).lower()
        if method in ("compressed-tensors", "compressed_tensors"):  # a float8 scheme (compressed_tensors.py)
            return cls._from_compressed_tensors(qc)
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8 activation_scheme {scheme!r} is not supported; supported: dynamic, static.")
        ignored = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ()
        if qc.get("weight_block_size"):
            if scheme == "static":
                raise ValueError("fp8 checkpoints with block-wise scales and static activation scales are not "
                                 "supported; supported with weight_block_size: activation_scheme dynamic.")
            return cls(serialized=True, weight_strategy="block", block=_block_shape(qc["weight_block_size"]),
                       ignored=ignored)
        return cls(serialized=True, weight_strategy="tensor", static_activations=scheme == "static",
                   ignored=ignored)

    @classmethod
    def _from_compressed_tensors(cls, qc: dict[str, Any]) -> Fp8Config:
        groups = list((qc.get("config_groups") or {}).values())
        if len(groups) != 1:
            raise ValueError(f"compressed-tensors checkpoints with {len(groups)} config_groups are not supported; "
                             "supported: one float8 group (FP8, FP8_DYNAMIC).")
        weights, acts = groups[0].get("weights") or {}, groups[0].get("input_activations")
        scheme = f"weights={weights}, input_activations={acts}"
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise ValueError(f"compressed-tensors scheme {scheme} is not supported; supported compressed-tensors "
                             "schemes: float8 weights (per tensor or channel) with float8 activations (FP8, "
                             "FP8_DYNAMIC).")
        strategy = weights.get("strategy", "tensor")
        if strategy not in ("tensor", "channel", "block"):
            raise ValueError(f"compressed-tensors float8 weight strategy {strategy!r} is not supported; supported: "
                             "tensor, channel, block.")
        if acts is None and strategy != "block":  # W8A16: fp8 weights, 16-bit activations
            return cls(serialized=True, weight_strategy=strategy, weight_only=True, ignored=qc.get("ignore") or ())
        if acts is not None and (acts.get("type") != "float" or acts.get("num_bits") != 8):
            raise ValueError(f"compressed-tensors scheme {scheme} is not supported; supported: float8 weights with "
                             "float8 activations (FP8, FP8_DYNAMIC, FP8_BLOCK) or 16-bit ones (FP8 W8A16, per tensor "
                             "or channel).")
        static = acts is not None and not acts.get("dynamic", False)
        if static and (acts.get("strategy", "tensor") != "tensor" or strategy == "block"):
            raise ValueError(f"compressed-tensors static activation strategy {acts.get('strategy')!r} with "
                             f"{strategy} weight scales is not supported; supported: tensor (static) or dynamic.")
        if strategy == "block":  # FP8_BLOCK: the scales are the weight_scale tensor, one per block
            return cls(serialized=True, weight_strategy="block", block=_block_shape(weights.get("block_structure")),
                       block_scale_name="weight_scale", ignored=qc.get("ignore") or ())
        return cls(serialized=True, weight_strategy=strategy, static_activations=static,
                   ignored=qc.get("ignore") or ())

    @classmethod
    def from_fbgemm(cls, qc: dict[str, Any]) -> Fp8Config:
        """FBGEMM fp8 checkpoints (``quant_method: fbgemm_fp8``, Meta's Llama 3.1 FP8 releases): fp8 ``weight`` with
        a ``weight_scale`` per output channel ``[out, 1]`` and dynamic per-token activations, the compressed-tensors
        FP8_DYNAMIC layout; ``modules_to_not_convert`` stay 16-bit. Its ``activation_scale_ub`` (a cap on each
        token's activation scale) is not applied: tokens past it keep their own scale, which only rounds them more
        finely than FBGEMM would (logged)."""
        if qc.get("activation_scale_ub") is not None:
            logger.info("fbgemm_fp8: activation_scale_ub %s is not applied; each token's activations take their own "
                        "absmax scale.", qc["activation_scale_ub"])
        return cls(serialized=True, weight_strategy="channel", ignored=qc.get("modules_to_not_convert") or ())

    @classmethod
    def from_modelopt(cls, qc: dict[str, Any]) -> Fp8Config:
        """NVIDIA ModelOpt's FP8 checkpoints (``quant_method: modelopt``): ``quant_algo: FP8`` (e.g. the nvidia/*-FP8
        releases: fp8 ``weight`` with a per-tensor ``weight_scale`` and a static per-tensor ``input_scale``, the
        ``quant_method: fp8`` static layout), ``FP8_PER_CHANNEL_PER_TOKEN`` (a ``weight_scale`` per output channel,
        dynamic per-token activations), ``FP8_PB_WO`` (weight-only, a ``weight_scale`` per 128 x 128 block, run
        w8a16 like the other block layouts) and ``MXFP8`` (an E8M0 ``weight_scale`` per 32 inputs of a row: blocks
        of one row by 32, run w8a16); ``exclude_modules`` (names or ``*`` wildcards) stay 16-bit, and
        ``kv_cache_quant_algo: FP8`` checkpoints carry ``k_scale`` / ``v_scale``, read when the cache is fp8."""
        algo = str(qc.get("quant_algo") or "").upper()
        if algo == "FP8":
            config = cls(serialized=True, weight_strategy="tensor", static_activations=True,
                         ignored=modelopt_excluded(qc))
        elif algo == "FP8_PER_CHANNEL_PER_TOKEN":  # the FP8_DYNAMIC layout with [out] scales
            config = cls(serialized=True, weight_strategy="channel", ignored=modelopt_excluded(qc),
                         modelopt_scales=True)
        elif algo == "MXFP8":  # e4m3 weights, an E8M0 exponent per 32 inputs: blocks of (1, 32), run w8a16
            logger.info("ModelOpt MXFP8: the weights run w8a16 (each block of 32 scaled by its power of two); the "
                        "checkpoint's MXFP8 activation quantization is not applied.")
            config = cls(serialized=True, weight_strategy="block", block=(1, MXFP8_BLOCK),
                         block_scale_name="weight_scale", ignored=modelopt_excluded(qc), e8m0_scales=True)
        elif algo == "FP8_PB_WO":  # weight-only 128 x 128 blocks (vLLM's size too), scales [out/128, 1, in/128, 1]
            config = cls(serialized=True, weight_strategy="block", block=MODELOPT_FP8_BLOCK,
                         block_scale_name="weight_scale", ignored=modelopt_excluded(qc), modelopt_scales=True)
        else:
            raise ValueError(f"ModelOpt quant_algo {qc.get('quant_algo')!r} is not supported; supported: FP8 "
                             "(per-tensor fp8 weights with static activation scales), FP8_PER_CHANNEL_PER_TOKEN, "
                             "FP8_PB_WO (128 x 128 weight blocks), MXFP8, NVFP4, W4A16_NVFP4, MIXED_PRECISION.")
        config.quantized_lm_head = not config.is_ignored("lm_head")  # ModelOpt quantizes every Linear not excluded
        return config

    def is_ignored(self, prefix: str) -> bool:
        for pattern in self.ignored:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], prefix):
                    return True
            elif prefix == pattern or prefix.endswith("." + pattern) or pattern.endswith("." + prefix):
                return True
        return False

    def linear_method(self, prefix: str) -> LinearMethod | None:
        return None if self.is_ignored(self.global_prefix(prefix)) else Fp8LinearMethod(self)

    def shard_tensor(self, name: str, tensor: torch.Tensor, parallel: str, start: int, length: int) -> torch.Tensor:
        """Per-channel weight scales follow the output features, block scales their rows or columns of blocks;
        per-tensor ones and input scales are every rank's."""
        if self.weight_strategy == "block" and name.endswith(f".{self.block_scale_name}"):
            size = self.block[0] if parallel == "column" else self.block[1]
            if start % size or length % size:
                raise ValueError(f"fp8: {name.rsplit('.', 1)[0]} cannot be split over the ranks: each rank's {length} "
                                 f"{'output' if parallel == 'column' else 'input'} features (from {start}) are not "
                                 f"whole {size}-wide scale blocks; use fewer ranks.")
            dim = 0 if parallel == "column" else (2 if tensor.dim() == 4 else 1)  # ModelOpt: [rows, 1, columns, 1]
            return tensor.narrow(dim, start // size, length // size)
        if name.endswith((".weight_scale", ".input_scale")):
            if tensor.numel() == 1 or parallel == "row" or name.endswith(".input_scale"):
                return tensor
            return tensor.narrow(0, start, length)
        return plain_shard(tensor, parallel, start, length)

    def moe_method(self, prefix: str) -> Fp8MoEMethod | None:
        return None if self.is_ignored(self.global_prefix(prefix)) else Fp8MoEMethod(self)

    def register_weight_scales(self, holder: nn.Module, prefix: str, sizes: Sequence[int], in_features: int) -> None:
        """The checkpoint's scale parameters of an fp8 weight of ``sizes`` output rows per shard (a merged
        projection's parts, or every expert's): ``{prefix}weight_scale`` per channel or one per shard, with static
        activations ``{prefix}input_scale`` per shard; or the block scales (one row per ``block_n`` output rows, so a
        shard starting at row ``r`` starts at scale row ``r / block_n``)."""
        if self.weight_strategy == "block":
            block_n, block_k = self.block
            blocks = (-(-sum(sizes) // block_n), -(-in_features // block_k))
            if self.modelopt_scales:
                blocks = (blocks[0], 1, blocks[1], 1)
            dtype, fill = (torch.uint8, _fill_e8m0) if self.e8m0_scales else (torch.float32, _fill_scale)
            new_parameter(holder, f"{prefix}{self.block_scale_name}", blocks, dtype, pack_factor=block_n,
                          dummy_fill=fill)
            return
        if self.weight_strategy == "channel":
            shape = (sum(sizes),) if self.modelopt_scales else (sum(sizes), 1)
            new_parameter(holder, f"{prefix}weight_scale", shape, torch.float32, dummy_fill=_fill_scale)
        else:
            new_parameter(holder, f"{prefix}weight_scale", (len(sizes),), torch.float32,
                          shard_offsets=shard_starts(sizes), dummy_fill=_fill_scale)
        if self.static_activations:
            new_parameter(holder, f"{prefix}input_scale", (len(sizes),), torch.float32,
                          shard_offsets=shard_starts(sizes), dummy_fill=_fill_scale)

    def take_weight_scales(self, holder: nn.Module, prefix: str, sizes: Sequence[int]) -> torch.Tensor:
        """The scales loaded into :meth:`register_weight_scales`' parameter, which is dropped, as the kernels read
        them: block scales as they are, else one fp32 scale per output channel (a shard's per-tensor scale spread
        over its rows, which is exact)."""
        name = f"{prefix}{self.block_scale_name if self.weight_strategy == 'block' else 'weight_scale'}"
        scale = getattr(holder, name).data
        scale = torch.exp2(scale.float() - 127) if self.e8m0_scales else scale.float()
        delattr(holder, name)
        if self.weight_strategy == "channel":
            scale = scale.reshape(-1)
        elif self.weight_strategy == "block" and scale.dim() == 4:  # ModelOpt's [rows, 1, columns, 1]
            scale = scale.reshape(scale.shape[0], scale.shape[2])
        elif self.weight_strategy == "tensor":
            scale = scale.repeat_interleave(torch.tensor(tuple(sizes), device=scale.device))
        return scale.contiguous()

    def summary(self) -> str:
        if self.weight_only:
            return f"fp8 (checkpoint, {self.weight_strategy} weight scales, 16-bit activations: W8A16)"
        if self.e8m0_scales:
            return f"fp8 (MXFP8 checkpoint, a power-of-two scale per {self.block[1]} inputs, 16-bit activations)"
        if self.weight_strategy == "block":
            return f"fp8 (checkpoint, {self.block[0]}x{self.block[1]} block weight scales, 16-bit activations)"
        kind = f"checkpoint, {self.weight_strategy} weight scales" if self.serialized else "online, per-channel"
        acts = "static per-tensor" if self.static_activations else "dynamic per-token"
        return f"fp8 ({kind}, {acts} activation scales)"


MODELOPT_FP8_BLOCK = (128, 128)  # FP8_PB_WO's weight blocks: the configs carry no size
MXFP8_BLOCK = 32  # inputs an E8M0 scale of MXFP8 covers


def modelopt_excluded(qc: dict[str, Any]) -> list[str]:
    """A ModelOpt config's modules left 16-bit (``exclude_modules``: names, or ``*`` wildcards as ``re:`` patterns),
    after checking what its KV cache holds (``kv_cache_quant_algo``: FP8 scales, read when the cache is fp8)."""
    kv_algo = qc.get("kv_cache_quant_algo")
    if kv_algo not in (None, "FP8"):
        raise ValueError(f"ModelOpt kv_cache_quant_algo {kv_algo!r} is not supported; supported: FP8 (its scales "
                         "serve --kv-cache-dtype fp8), or none.")
    exclude = qc.get("exclude_modules") or qc.get("ignore") or ()
    return [f"re:{fnmatch.translate(p)}" if any(c in p for c in "*?[") else p for p in exclude]


def _block_shape(value: Any) -> tuple[int, int]:
    """A checkpoint's scale block ``[rows, columns]``."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"fp8 block-wise scales need a block of [rows, columns], got {value!r}.")
    return int(value[0]), int(value[1])


def _fill_fp8(tensor: torch.Tensor, gen: torch.Generator) -> None:
    values = torch.empty(tensor.shape).uniform_(-1.0, 1.0, generator=gen) if tensor.device.type == "cpu" \
        else torch.empty(tensor.shape, device=tensor.device).uniform_(-1.0, 1.0)
    tensor.copy_(values.to(FP8_DTYPE))


def _fill_scale(tensor: torch.Tensor, gen: torch.Generator) -> None:
    tensor.fill_(1e-3)


def _fill_e8m0(tensor: torch.Tensor, gen: torch.Generator) -> None:
    tensor.fill_(127 - 10)  # 2 ** -10, as _fill_scale's 1e-3


class Fp8LinearMethod(LinearMethod):
    def __init__(self, config: Fp8Config) -> None:
        self.config = config
        self.use_scaled_mm = False

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:  # fmt: skip
        out_features = sum(output_sizes)
        layer.output_sizes = tuple(output_sizes)
        if not self.config.serialized:
            new_parameter(layer, "weight", (out_features, in_features), params_dtype)
            return
        new_parameter(layer, "weight", (out_features, in_features), FP8_DTYPE, dummy_fill=_fill_fp8)
        if self.config.weight_strategy == "block":
            block_n = self.config.block[0]
            if len(output_sizes) > 1 and any(size % block_n for size in output_sizes):
                raise ValueError(f"fp8 block-wise scales of {block_n} rows do not split the merged projection of "
                                 f"sizes {tuple(output_sizes)} into its parts.")
        self.config.register_weight_scales(layer, "", output_sizes, in_features)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.config.weight_strategy == "block":
            scale = self.config.take_weight_scales(layer, "", layer.output_sizes)  # [rows / block, columns / block]
            replace_parameter(layer, "weight", layer.weight.data.contiguous())
            replace_parameter(layer, "weight_scale", scale)
            layer.input_scale = None
            return
        if self.config.weight_only:  # one scale per output row: blocks of (1, in_features) for the block kernel
            scale = self.config.take_weight_scales(layer, "", layer.output_sizes)
            replace_parameter(layer, "weight", layer.weight.data.contiguous())
            replace_parameter(layer, "weight_scale", scale.reshape(-1, 1).contiguous())
            layer.input_scale = None
            return
        if not self.config.serialized:
            weight, scale = quantize_per_channel(layer.weight.data)
        else:
            weight, scale = layer.weight.data, self.config.take_weight_scales(layer, "", layer.output_sizes)
        replace_parameter(layer, "weight", weight.contiguous())
        replace_parameter(layer, "weight_scale", scale.contiguous())
        if self.config.static_activations:
            replace_parameter(layer, "input_scale", layer.input_scale.data.float().max().reshape(1))
        else:
            layer.input_scale = None
        out_features, in_features = layer.weight.shape
        # torch._scaled_mm needs both dims in multiples of 16; other shapes keep the (slow) reference.
        self.use_scaled_mm = fp8_supported(layer.weight.device) and out_features % 16 == 0 and in_features % 16 == 0
        if fp8_supported(layer.weight.device) and not self.use_scaled_mm:
            logger.warning("fp8 layer of shape %s runs the dequantize-then-matmul reference: torch._scaled_mm "
                           "needs dims that are multiples of 16.", tuple(layer.weight.shape))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.config.weight_strategy == "block":
            return fp8_block_linear(x, layer.weight, layer.weight_scale, self.config.block, bias, backend=layer.backend)
        if self.config.weight_only:
            return fp8_block_linear(x, layer.weight, layer.weight_scale, (1, layer.in_features), bias,
                                    backend=layer.backend)
        if self.use_scaled_mm and layer.backend != "torch":
            return fp8_linear(x, layer.weight, layer.weight_scale, layer.input_scale, bias)
        return fp8_linear_ref(x, layer.weight, layer.weight_scale, layer.input_scale, bias)

    def takes_fp8_activations(self, layer: nn.Module) -> bool:
        return self.use_scaled_mm and layer.backend != "torch" and layer.input_scale is None

    def apply_fp8_activations(self, layer: nn.Module, x: Fp8Activations, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.takes_fp8_activations(layer):
            return self.apply(layer, x.x, bias)
        return fp8_linear(x.x, layer.weight, layer.weight_scale, None, bias, quantized=(x.xq, x.scale))

    def may_rope_cache(self, layer: nn.Module, x: torch.Tensor | Fp8Activations | NormedRows) -> bool:
        return isinstance(x, (Fp8Activations, NormedRows))  # rows quantized upstream, or to be normed in the kernel

    def apply_rope_cache(self, layer: nn.Module, x: Fp8Activations | NormedRows, **rope) -> torch.Tensor | None:
        """A qkv layer's product with the attention prep in its epilogue (``fp8_qkv_rope_cache``: ``rope`` holds
        its arguments after the weight scale), or None where that kernel does not serve it."""
        if not self.takes_fp8_activations(layer) or layer.bias is not None:
            return None
        return fp8_qkv_rope_cache(x, layer.weight, layer.weight_scale, **rope)

    def may_norm_rows(self, layer: nn.Module) -> bool:
        return self.takes_fp8_activations(layer) and norm_prologue_configured(layer.weight)

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor | Fp8Activations | NormedRows,
                           down: nn.Module) -> torch.Tensor | None:  # fmt: skip
        """A gate_up layer's ``silu_and_mul`` output in its GEMM's launch (``fp8_gate_up_silu``), or None where that
        kernel does not serve ``x`` or the ``down`` layer that reads the result."""
        if not (isinstance(x, (Fp8Activations, NormedRows)) and self.takes_fp8_activations(layer) and layer.bias is None
                and isinstance(down.quant_method, Fp8LinearMethod) and down.quant_method.takes_fp8_activations(down)):
            return None
        return fp8_gate_up_silu(x, layer.weight, layer.weight_scale, down.weight)


class Fp8MoEMethod:
    """A sparse MoE block's experts in e4m3 with one fp32 scale per expert and output channel, run w8a16 by the
    fused MoE kernel (``kernels/fused_moe.py``: each weight tile widened in registers, the products scaled): half the
    bytes of the experts' weights, which decode reads. Online (``--quantization fp8``) the stacked ``w13`` / ``w2``
    are quantized per channel after loading; an fp8 checkpoint's per-expert tensors load into e4m3 ``w13`` / ``w2``
    with their scales (per tensor: one per expert and projection, spread over its channels; per channel; per block
    of each expert's weight, which the kernel applies to each K step's partial product). A static
    ``input_scale`` is read and unused: the activations stay in the model's dtype (w8a16), which the scale was
    calibrated to approximate."""

    def __init__(self, config: Fp8Config) -> None:
        self.config = config

    def create_weights(self, block: nn.Module) -> bool:
        """Register the checkpoint's e4m3 ``w13`` / ``w2`` and their scales; False (online): the block's own 16-bit
        ``w13`` / ``w2`` load, quantized after loading."""
        if not self.config.serialized:
            return False
        experts, inter, hidden = block.num_experts, block.inter, block.hidden
        new_parameter(block, "w13", (experts * 2 * inter, hidden), FP8_DTYPE, dummy_fill=_fill_fp8)
        new_parameter(block, "w2", (experts * hidden, inter), FP8_DTYPE, dummy_fill=_fill_fp8)
        if self.config.weight_strategy == "block":
            block_n, block_k = self.config.block
            if block_k % 16:
                raise ValueError(f"fp8 block-wise expert scales need blocks of a multiple of 16 inputs (the fused MoE "
                                 f"kernel's K steps), got {self.config.block}.")
            if inter % block_n or hidden % block_n:
                raise ValueError(f"fp8 block-wise scales of {block_n} rows do not tile the experts' projections (an "
                                 f"expert's width {inter}, hidden size {hidden}): their rows must be whole blocks.")
        for name, sizes, k in self._projections(block):
            self.config.register_weight_scales(block, f"{name}_", sizes, k)
        return True

    @staticmethod
    def _projections(block: nn.Module) -> tuple[tuple[str, tuple[int, ...], int], ...]:
        """(name, every expert's output rows per shard, input size) of w13 (gate and up) and w2."""
        experts, inter, hidden = block.num_experts, block.inter, block.hidden
        return ("w13", (inter,) * (2 * experts), hidden), ("w2", (hidden,) * experts, inter)

    def process_weights_after_loading(self, block: nn.Module) -> None:
        for name, sizes, _ in self._projections(block):
            weight = getattr(block, name).data
            if not self.config.serialized:
                weight, scale = quantize_per_channel(weight)
            else:  # per block: [E * rows / block_n, K / block_k]; else one per output channel
                scale = self.config.take_weight_scales(block, f"{name}_", sizes)
                if self.config.static_activations:
                    delattr(block, f"{name}_input_scale")
            replace_parameter(block, name, weight.contiguous())
            replace_parameter(block, f"{name}_scale", scale)

    def experts(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, ExpertQuant]:
        """``w13 [E, 2I, H]``, ``w2 [E, H, I]`` and their scales as the fused MoE kernel reads them: ``[E, 2I]`` and
        ``[E, H]`` per channel, or per block ``[E, 2I / block_n, H / block_k]`` and ``[E, H / block_n, I /
        block_k]``."""
        experts = block.num_experts
        w13, w2 = block.w13.view(experts, -1, block.hidden), block.w2.view(experts, block.hidden, -1)
        if self.config.weight_strategy == "block":
            return w13, w2, ExpertQuant(block.w13_scale.view(experts, -1, block.w13_scale.shape[-1]),
                                        block.w2_scale.view(experts, -1, block.w2_scale.shape[-1]), self.config.block)
        return w13, w2, ExpertQuant(block.w13_scale.view(experts, -1), block.w2_scale.view(experts, -1))


def fp8_mlp_half_config(x: torch.Tensor, o_proj: nn.Module | None, gate_up: nn.Module | None,
                        down: nn.Module | None) -> MlpHalfConfig | None:  # fmt: skip
    """The config of the one-launch MLP half (``kernels/fp8_mlp_gluon.py``: o_proj, the post-attention norm,
    gate_up and down) for a decode step over ``x``'s rows, or None where it does not apply: W8A8 fp8 layers with
    dynamic activations and no bias, none split over devices (a row-parallel layer's all-reduce sits between the
    GEMMs), a shape its table has an entry for. Cheap: a decoder layer asks before attention."""
    if not mlp_half_configured() or x.dim() != 2 or x.shape[0] == 0 or not x.is_cuda:
        return None
    for layer in (o_proj, gate_up, down):
        method = getattr(layer, "quant_method", None)
        if (not isinstance(method, Fp8LinearMethod) or not method.takes_fp8_activations(layer)
                or layer.bias is not None or hasattr(layer, "tp_group")):  # fmt: skip
            return None
    return mlp_half_config(o_proj.weight.shape[0], o_proj.weight.shape[1], down.weight.shape[1])


def fp8_mlp_half(attn: torch.Tensor, residual: torch.Tensor, o_proj: nn.Module, norm: nn.Module, gate_up: nn.Module,
                 down: nn.Module, config: MlpHalfConfig) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """``(mlp(norm(o_proj(attn) + residual)), o_proj(attn) + residual)`` in one launch (layers for which
    :func:`fp8_mlp_half_config` gave ``config``), or None where the kernel does not serve these rows (then run
    o_proj, the norm and the MLP)."""
    if (not mlp_half_supported(attn, o_proj.weight, gate_up.weight, down.weight)
            or residual.shape != (attn.shape[0], o_proj.weight.shape[0]) or not residual.is_contiguous()
            or residual.dtype != attn.dtype):  # fmt: skip
        return None
    return gluon_fp8_mlp_half(attn, residual, o_proj.weight, o_proj.weight_scale, norm.weight, norm.eps,
                              gate_up.weight, gate_up.weight_scale, down.weight, down.weight_scale, config)
