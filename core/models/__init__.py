"""Model families, one file each; core/models/registry.py maps HF architecture names to them."""

from core.models.registry import model_class, read_config, supported_architectures

__all__ = ["model_class", "read_config", "supported_architectures"]
