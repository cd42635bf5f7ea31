"""Model registry: HF architecture name -> the family module that implements it.

Each family is one file in core/models/ with a ``read_config(hf_dict, architecture) -> ModelConfig`` (its own config
reading) and a model class taking ``(config, *, attention_backend, kernel_backend)`` with ``load_weights``,
``init_dummy_weights``, ``forward`` and ``compute_logits``. Adding a family = one file + one line here. Modules are
imported on first use, so a family's dependencies never load for another's checkpoints.
"""

from __future__ import annotations

import importlib
from typing import Any

from core.config import ModelConfig

# HF architecture name -> (module in core.models, model class name)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Starcoder2ForCausalLM": ("starcoder2", "Starcoder2ForCausalLM"),
    "GPTNeoXForCausalLM": ("gpt_neox", "GPTNeoXForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "FalconForCausalLM": ("falcon", "FalconForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen_moe", "Qwen3MoeForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def _architecture(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"Unsupported model architecture {archs or d.get('model_type')}; "
            f"supported: {supported_architectures()}."
        )
    return arch


def _module(arch: str):
    return importlib.import_module(f"core.models.{ARCHITECTURES[arch][0]}")


def read_config(d: dict[str, Any]) -> ModelConfig:
    """Parse an HF config dict with the reader of its family (ValueError naming what is supported otherwise)."""
    arch = _architecture(d)
    return _module(arch).read_config(d, arch)


def model_class(cfg: ModelConfig) -> type:
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"Unsupported model architecture {cfg.architecture}; supported: {supported_architectures()}.")
    return getattr(_module(cfg.architecture), ARCHITECTURES[cfg.architecture][1])
