"""Model registry: HF architecture name -> implementation."""

from core.config import SUPPORTED_ARCHITECTURES, ModelConfig
from core.models.llama import LlamaForCausalLM

_REGISTRY = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def model_class(cfg: ModelConfig) -> type[LlamaForCausalLM]:
    return _REGISTRY[cfg.architecture]
