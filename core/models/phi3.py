"""Phi-3: the Llama decoder with the checkpoint's qkv and gate_up already fused (they load as they are), partial rotary
(``partial_rotary_factor``), longrope / su RoPE scaling (core/layers/rotary.py) and an optional sliding window."""

from __future__ import annotations

from typing import Any

from core.config import ModelConfig, common_fields
from core.models.llama import LlamaForCausalLM


def read_config(d: dict[str, Any], architecture: str) -> ModelConfig:
    fields = common_fields(d, architecture)
    rope = d.get("rope_parameters") or {}
    factor = float(d.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
    scaling = fields["rope_scaling"]
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}
        if scaling["rope_type"] == "longrope" and "original_max_position_embeddings" not in scaling:
            scaling["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        fields["rope_scaling"] = scaling
    rotary_dim = int(fields["head_dim"] * factor)
    return ModelConfig(**fields, extra={"rotary_dim": rotary_dim} if rotary_dim != fields["head_dim"] else {})


Phi3ForCausalLM = LlamaForCausalLM

# Llama's layers: their quantization methods. The fused qkv / gate_up tensors load whole (a per-tensor fp8 scale
# covers every shard; a GGUF file's fused tensors stay in their blocks).
SUPPORTED_QUANTIZATION = ("fp8", "awq", "gptq", "gguf", "bitsandbytes", "nvfp4")
