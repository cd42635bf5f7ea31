"""NVIDIA ModelOpt ``quant_algo: MIXED_PRECISION`` checkpoints: each quantized module names its own algorithm in
``quantized_layers`` (``{"model.layers.0.self_attn.q_proj": {"quant_algo": "FP8"}, ...}``); modules it does not list
stay 16-bit, as do listed ones that ``exclude_modules`` names. Every layer runs its algorithm's method (``fp8.py``'s
FP8 / FP8_PER_CHANNEL_PER_TOKEN / FP8_PB_WO / MXFP8 layouts, ``nvfp4.py``'s NVFP4 / W4A16_NVFP4), as vLLM reads these
checkpoints.

One config per algorithm present is built from the checkpoint's scheme; this config routes each layer, MoE block and
checkpoint tensor to its module's config. Merged projections (q / k / v, gate / up) take one method, so their parts
must share an algorithm; a block's experts take one too, and a module listed with an algorithm no config serves fails
at startup naming both.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from core.layers.quantization.base import LinearMethod, QuantConfig, module_listed, plain_shard

# The algorithms a layer may name, and how they are read (quant_algo of a one-algorithm ModelOpt checkpoint)
MIXED_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "MXFP8", "NVFP4", "W4A16_NVFP4")
# A merged projection's first part -> its parts (the model passes the first part's name)
MERGED_PARTS = {"q_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj")}


def modelopt_config(qc: dict[str, Any]) -> QuantConfig:
    """The config of a ModelOpt scheme by its ``quant_algo``: ``nvfp4.py``'s for NVFP4 / W4A16_NVFP4, this module's
    for MIXED_PRECISION, ``fp8.py``'s for the rest (which names every algorithm where it serves none)."""
    from core.layers.quantization.fp8 import Fp8Config
    from core.layers.quantization.nvfp4 import Nvfp4Config

    algo = str(qc.get("quant_algo") or "").upper()
    if algo == "MIXED_PRECISION":
        return ModelOptMixedConfig.from_hf(qc)
    return Nvfp4Config.from_modelopt(qc) if algo in ("NVFP4", "W4A16_NVFP4") else Fp8Config.from_modelopt(qc)


class ModelOptMixedConfig(QuantConfig):
    name = "modelopt"

    def __init__(self, layers: dict[str, str], parts: dict[str, QuantConfig]) -> None:
        """``layers``: checkpoint module name -> its algorithm; ``parts``: algorithm -> the config that runs it."""
        self.layers = layers
        self.parts = parts
        self.quantized_lm_head = "lm_head" in layers

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> ModelOptMixedConfig:
        from core.layers.quantization.fp8 import modelopt_excluded

        listed = qc.get("quantized_layers")
        if not isinstance(listed, dict) or not listed:
            raise ValueError("ModelOpt MIXED_PRECISION needs a non-empty 'quantized_layers' mapping of module names "
                             "to their quant_algo.")
        excluded = modelopt_excluded(qc)  # also checks the KV cache's algorithm
        layers = {}
        for module, entry in listed.items():
            if module_listed(excluded, module):  # exclude_modules wins, as vLLM reads it
                continue
            algo = str((entry or {}).get("quant_algo") or "").upper()
            if algo not in MIXED_ALGOS:
                raise ValueError(f"ModelOpt MIXED_PRECISION module {module!r} has quant_algo "
                                 f"{(entry or {}).get('quant_algo')!r}; supported: {', '.join(MIXED_ALGOS)}.")
            layers[module] = algo
        parts = {algo: modelopt_config({"quant_algo": algo, "exclude_modules": [],
                                        "group_size": _group_size(listed, algo)})
                 for algo in sorted(set(layers.values()))}  # fmt: skip
        return cls(layers, parts)

    def _module_config(self, module: str) -> QuantConfig | None:
        algo = self.layers.get(module)
        return None if algo is None else self.parts[algo]

    def _merged_config(self, name: str) -> QuantConfig | None:
        """The config of checkpoint module ``name`` and, for a merged projection's first part, of all its parts
        (ValueError where they differ)."""
        base, _, last = name.rpartition(".")
        names = [f"{base}.{part}" for part in MERGED_PARTS.get(last, (last,))] if base else [name]
        algos = {self.layers.get(n) for n in names}
        if len(algos) > 1:
            raise ValueError(f"ModelOpt MIXED_PRECISION gives the merged parts {names} different quant_algo "
                             f"({', '.join(str(a) for a in algos)}); one algorithm per merged projection is "
                             "supported.")
        return self._module_config(names[0])

    def linear_method(self, prefix: str) -> LinearMethod | None:
        config = self._merged_config(self.global_prefix(prefix))
        return None if config is None else config.linear_method(prefix)

    def moe_method(self, prefix: str) -> Any:
        """The experts' config: every ``{prefix}.experts.`` module listed must name one algorithm (none listed: the
        experts stay 16-bit)."""
        experts = f"{self.global_prefix(prefix)}.experts."
        algos = {algo for module, algo in self.layers.items() if module.startswith(experts)}
        if len(algos) > 1:
            raise ValueError(f"ModelOpt MIXED_PRECISION gives the experts of {prefix} several quant_algo "
                             f"({', '.join(sorted(algos))}); one algorithm per MoE block is supported (its experts "
                             "are stacked).")
        return self.parts[algos.pop()].moe_method(prefix) if algos else None

    def _tensor_config(self, name: str) -> QuantConfig | None:
        """The config of checkpoint tensor ``name``'s module: tensors are routed by the checkpoint's own names (the
        stream is cut and renumbered for a stage after this), layers by the model's (:meth:`global_prefix`)."""
        return self._module_config(name.rsplit(".", 1)[0])

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            config = self._tensor_config(name)
            yield from ([(name, tensor)] if config is None else config.checkpoint_tensors([(name, tensor)]))

    def shard_tensor(self, name: str, tensor: torch.Tensor, parallel: str, start: int, length: int) -> torch.Tensor:
        config = self._tensor_config(name)
        if config is None:
            return plain_shard(tensor, parallel, start, length)
        return config.shard_tensor(name, tensor, parallel, start, length)

    def permute_outputs(self, name: str, tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        config = self._tensor_config(name)
        return (config or super()).permute_outputs(name, tensor, order)

    def lm_head(self, hidden_size: int, vocab_size: int, backend: str) -> nn.Module | None:
        if not self.quantized_lm_head:
            return None
        head = copy.copy(self.parts[self.layers["lm_head"]])
        head.quantized_lm_head = True
        return head.lm_head(hidden_size, vocab_size, backend)

    def for_stage(self, first_layer: int) -> ModelOptMixedConfig:
        part = super().for_stage(first_layer)
        part.parts = {algo: config.for_stage(first_layer) for algo, config in self.parts.items()}
        return part

    def for_tensor_parallel(self, tp: int, row_parallel_modules: Sequence[str]) -> ModelOptMixedConfig:
        part = super().for_tensor_parallel(tp, row_parallel_modules)
        part.parts = {algo: config.for_tensor_parallel(tp, row_parallel_modules) for algo, config in self.parts.items()}
        return part

    def methods(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(config.name for config in self.parts.values()))

    def summary(self) -> str:
        counts = Counter(self.layers.values())
        return "modelopt mixed precision (" + ", ".join(f"{algo}: {n} modules" for algo, n in sorted(counts.items())) \
            + "; unlisted modules 16-bit)"


def _group_size(listed: dict[str, Any], algo: str) -> int:
    """The NVFP4 modules' ``group_size`` (16 unless they say; one for all), for ``Nvfp4Config.from_modelopt``."""
    sizes = {int((entry or {}).get("group_size") or 16) for entry in listed.values()
             if str((entry or {}).get("quant_algo") or "").upper() == algo}
    if len(sizes) > 1:
        raise ValueError(f"ModelOpt MIXED_PRECISION {algo} modules with group sizes {sorted(sizes)}; one is supported.")
    return sizes.pop() if sizes else 16
