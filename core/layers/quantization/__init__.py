"""Weight quantization: which method a checkpoint (or ``--quantization``) asks for, and which model families run it.

A method is a ``QuantConfig`` subclass (``base.py``) registered in ``QUANTIZATION_METHODS``; its ``LinearMethod``
gives each ``Linear`` its weight storage and matmul. The resolved config rides on ``ModelConfig.quantization``, so
every path that builds a model (target, draft, pooling) sees the same one. A family runs quantized only if its module
lists the method in ``SUPPORTED_QUANTIZATION`` (core/models/llama.py); others fail at startup naming the method.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import TYPE_CHECKING, Any

from core.layers.quantization.base import LinearMethod, QuantConfig

if TYPE_CHECKING:
    from core.config import ModelConfig

logger = logging.getLogger(__name__)

# Method name -> "module:class" (imported on first use).
QUANTIZATION_METHODS: dict[str, str] = {
    "fp8": "core.layers.quantization.fp8:Fp8Config",
    "awq": "core.layers.quantization.int4:AWQConfig",
    "gptq": "core.layers.quantization.int4:GPTQConfig",
    "gguf": "core.layers.quantization.gguf:GGUFConfig",
    "bitsandbytes": "core.layers.quantization.bnb:BitsAndBytesConfig",
    "experts_int8": "core.layers.quantization.experts_int8:ExpertsInt8Config",
}

# ``--quantization`` values of vLLM that name another kernel for a checkpoint method ours serve (Marlin) or the
# checkpoint format: accepted for a checkpoint of that method (ipc/config.py: QUANTIZATION_ALIASES), never applied
# online. Value: (our method, None for the checkpoint's scheme's; the checkpoint ``quant_method`` spellings).
REQUESTED_ALIASES = {"awq_marlin": ("awq", ("awq",)), "gptq_marlin": ("gptq", ("gptq",)),
                     "compressed-tensors": (None, ("compressed-tensors", "compressed_tensors")),  # its scheme's
                     "modelopt": (None, ("modelopt",)), "modelopt_fp4": (None, ("modelopt",)),  # fp8 or nvfp4
                     "fbgemm_fp8": ("fp8", ("fbgemm_fp8",))}


# Methods that only quantize a 16-bit checkpoint at load (``--quantization``), never read from a checkpoint
ONLINE_ONLY_METHODS = ("experts_int8",)
# The ``quant_method`` values a checkpoint's config may carry (those of REQUESTED_ALIASES are formats of ours)
CHECKPOINT_METHODS = ("awq", "bitsandbytes", "compressed-tensors", "fbgemm_fp8", "fp8", "gptq", "modelopt")


def supported_methods() -> list[str]:
    return sorted(QUANTIZATION_METHODS)


def method_class(name: str) -> type[QuantConfig]:
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"Quantization method '{name}' is not supported; supported: {', '.join(supported_methods())}.")
    module, cls = QUANTIZATION_METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def checkpoint_method(hf_config: dict[str, Any]) -> str | None:
    """The ``quant_method`` of the checkpoint's ``quantization_config`` (lower case), or None if unquantized."""
    qc = hf_config.get("quantization_config") or hf_config.get("compression_config")
    if not qc:
        return None
    method = str(qc.get("quant_method") or qc.get("format") or "unknown").lower()
    return method


def quant_config_from_hf(hf_config: dict[str, Any]) -> QuantConfig | None:
    """The checkpoint's own quantization (``quantization_config`` in config.json), parsed; None if unquantized.
    An unknown method raises ValueError naming it and listing the supported ones."""
    method = checkpoint_method(hf_config)
    if method is None:
        return None
    qc = hf_config.get("quantization_config") or hf_config.get("compression_config")
    if method in ("compressed-tensors", "compressed_tensors"):  # one format, several schemes and methods
        from core.layers.quantization.compressed_tensors import from_compressed_tensors

        return from_compressed_tensors(qc)
    if method == "modelopt":  # one algorithm's method, or several (MIXED_PRECISION)
        from core.layers.quantization.modelopt_mixed import modelopt_config

        return modelopt_config(qc)
    if method == "fbgemm_fp8":  # the fp8 method's per-channel dynamic layout
        from core.layers.quantization.fp8 import Fp8Config

        return Fp8Config.from_fbgemm(qc)
    if method not in QUANTIZATION_METHODS or method in ONLINE_ONLY_METHODS:
        raise ValueError(f"The checkpoint is quantized with '{method}' (config.json quantization_config), which "
                         f"pagedserve does not support; supported checkpoint quantization methods: "
                         f"{', '.join(CHECKPOINT_METHODS)} (and .gguf files).")
    return method_class(method).from_hf(qc)


def resolve_quantization(model_config: ModelConfig, hf_config: dict[str, Any], requested: str | None
                         ) -> ModelConfig:  # fmt: skip
    """``model_config`` with ``quantization`` set: the checkpoint's, or ``requested`` (``--quantization``) applied
    online to an unquantized checkpoint. A requested method that contradicts the checkpoint's is an error, as is a
    family that cannot run the method."""
    quant = quant_config_from_hf(hf_config)
    online = False  # applied at load to an unquantized checkpoint
    if requested in REQUESTED_ALIASES:
        method, spellings = REQUESTED_ALIASES[requested]
        found = checkpoint_method(hf_config)
        if found not in spellings:
            raise ValueError(f"--quantization {requested} needs a checkpoint quantized with {spellings[0]} (its "
                             f"config.json quantization_config); this checkpoint is "
                             f"{'not quantized' if found is None else f'quantized with {found!r}'}. Supported: "
                             f"{', '.join(supported_methods())}.")
        if quant is None:  # a compressed-tensors checkpoint with sparsity only, stored dense
            raise ValueError(f"--quantization {requested}: this checkpoint's {found} config holds no quantization "
                             "scheme (its sparse weights are stored dense and load unquantized); leave "
                             "--quantization out.")
        method = method or quant.name  # compressed-tensors, modelopt: the method of the checkpoint's scheme
        logger.info("--quantization %s: the %s checkpoint runs on pagedserve's %s kernels.", requested, found, method)
        for name in quant.methods():  # the checkpoint's own quantization, as read
            check_family_supports(model_config.architecture, name)
        return dataclasses.replace(model_config, quantization=quant)
    if requested is not None:
        if requested not in QUANTIZATION_METHODS:
            raise ValueError(f"Unknown quantization method '{requested}'; supported: "
                             f"{', '.join(supported_methods())}.")
        if quant is None:
            quant = method_class(requested).online()
            online = True
        elif quant.name != requested:
            raise ValueError(f"--quantization {requested} was given, but the checkpoint is quantized with "
                             f"'{checkpoint_method(hf_config)}' ({quant.name}); leave --quantization out or match it.")
    if quant is None:
        return model_config
    for name in quant.methods():
        check_family_supports(model_config.architecture, name, online)
    return dataclasses.replace(model_config, quantization=quant)


def check_family_supports(architecture: str, method: str, online: bool = False) -> None:
    """ValueError unless the family's module lists ``method`` in its ``SUPPORTED_QUANTIZATION`` (or, ``online``:
    applied at load to a 16-bit checkpoint, in its ``ONLINE_QUANTIZATION``, methods that need no checkpoint layout)."""
    from core.models.registry import ARCHITECTURES, _module

    module = _module(architecture) if architecture in ARCHITECTURES else None
    supported = getattr(module, "SUPPORTED_QUANTIZATION", ())
    online_only = getattr(module, "ONLINE_QUANTIZATION", ())
    if online and method in online_only:
        return
    if method in online_only:
        raise ValueError(f"{architecture} checkpoints quantized with '{method}' are not supported; its 16-bit "
                         f"checkpoints are, quantized at load with --quantization {' or '.join(online_only)}.")
    if method not in supported:
        families = sorted(a for a in ARCHITECTURES
                          if method in getattr(_module(a), "SUPPORTED_QUANTIZATION", ()))  # fmt: skip
        raise ValueError(f"Quantization method '{method}' is not supported for {architecture} (its layers, e.g. MoE "
                         f"experts, have no {method} kernels); architectures that run {method}: "
                         f"{', '.join(families) or 'none'}.")


def weight_bytes(model) -> int:
    """Bytes of every parameter (quantized weights at their packed size): what the model holds on the device."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def linear_method(quant: QuantConfig | None, prefix: str) -> LinearMethod | None:
    """The layer's method, or None (unquantized model, or a layer the checkpoint left unquantized)."""
    return None if quant is None else quant.linear_method(prefix)


__all__ = ["LinearMethod", "QuantConfig", "QUANTIZATION_METHODS", "check_family_supports", "linear_method",
           "quant_config_from_hf", "resolve_quantization", "supported_methods", "weight_bytes"]
