"""compressed-tensors checkpoints (llm-compressor's format, e.g. the RedHatAI / neuralmagic releases): one config
format for several schemes, each served by the method that runs its numbers. float8 weights and activations (FP8,
FP8_DYNAMIC, FP8_BLOCK): ``fp8.Fp8Config``; 4-bit integer weights with 16-bit activations in the ``pack-quantized``
format (W4A16, symmetric, per group or channel, optional group act-order): ``int4.CompressedTensorsInt4Config``;
8-bit integer weights (W8A16 ``pack-quantized``, W8A8 ``int-quantized``, symmetric, per group or channel, run
w8a16): ``ct_int8.CompressedTensorsInt8Config``; NVFP4 (``nvfp4-pack-quantized``, run w4a16):
``nvfp4.Nvfp4Config``. Anything else fails naming the scheme and listing these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.compressed_sparsity import SPARSE_FORMATS
from core.layers.quantization.base import QuantConfig, module_listed

SUPPORTED_SCHEMES = ("float8 weights with float8 activations (FP8, FP8_DYNAMIC, FP8_BLOCK)",
                     "4-bit integer weights, symmetric, pack-quantized, with 16-bit or 8-bit activations (W4A16, W4A8 "
                     "run as W4A16)",
                     "8-bit integer weights, symmetric, with 16-bit or int8 activations (W8A16, W8A8 run as W8A16)",
                     "NVFP4 (fp4 e2m1 weights in blocks of 16, nvfp4-pack-quantized; run W4A16)")


def from_compressed_tensors(qc: dict[str, Any]) -> QuantConfig | None:
    """The method config for a compressed-tensors ``quantization_config``; None for a sparse-only checkpoint whose
    weights are stored dense (``sparsity_config`` format ``dense``, no quantization scheme): it loads unquantized,
    its zeros computed like any weight."""
    from core.layers.quantization.ct_int8 import CompressedTensorsInt8Config
    from core.layers.quantization.fp8 import Fp8Config
    from core.layers.quantization.int4 import CompressedTensorsInt4Config

    sparsity = qc.get("sparsity_config") or {}
    sparse_format = str(sparsity.get("format", "dense"))
    if sparse_format != "dense" and sparse_format not in SPARSE_FORMATS:
        raise ValueError(f"compressed-tensors sparsity format {sparse_format!r} is not supported; supported: sparse "
                         f"weights stored dense ('dense') or compressed as {', '.join(SPARSE_FORMATS)} (decompressed "
                         "at load, core/compressed_sparsity.py).")
    groups = list((qc.get("config_groups") or {}).values())
    if not groups and sparsity:
        return None
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors checkpoints with {len(groups)} config_groups are not supported; "
                         f"supported: one group of {' or '.join(SUPPORTED_SCHEMES)}.")
    weights = groups[0].get("weights") or {}
    targets = groups[0].get("targets") or ["Linear"]
    if list(targets) != ["Linear"]:  # a scheme for some layers only: the others would load as quantized
        raise ValueError(f"compressed-tensors config_groups targets {targets} are not supported; supported: "
                         "['Linear'] (every linear layer but the ignore list).")
    if weights.get("type") == "float" and weights.get("num_bits") == 4:
        from core.layers.quantization.nvfp4 import Nvfp4Config

        config = Nvfp4Config.from_ct(qc, groups[0])
    elif weights.get("type") == "float":
        config = Fp8Config.from_hf(qc)
    elif weights.get("type") == "int" and weights.get("num_bits") == 8:
        config = CompressedTensorsInt8Config.from_ct(qc, groups[0])
    elif weights.get("type") == "int":
        config = CompressedTensorsInt4Config.from_ct(qc, groups[0])
    else:
        raise ValueError(f"compressed-tensors scheme weights={weights} is not supported; supported: "
                         f"{'; '.join(SUPPORTED_SCHEMES)}.")
    config.quantized_lm_head = not module_listed(qc.get("ignore") or (), "lm_head")  # the scheme targets every Linear
    return config


def integer_scheme(qc: dict[str, Any], group: dict[str, Any], formats: Sequence[str], default_strategy: str,
                   problems: list[str]) -> tuple[int, bool]:  # fmt: skip
    """What the integer-weight schemes check alike (symmetric weights, one of ``formats``, a group or channel
    strategy, act order), after the caller's own ``problems``: a ValueError naming every problem, else ``(group
    size, or -1 per channel; group act order)``."""
    weights = group.get("weights") or {}
    if not weights.get("symmetric", True):
        problems.append("asymmetric weights with zero points (supported: symmetric)")
    fmt = str(qc.get("format", formats[0]))
    if fmt not in formats:
        problems.append(f"format {fmt!r} (supported: {', '.join(formats)})")
    strategy = weights.get("strategy", default_strategy)
    if strategy not in ("group", "channel"):
        problems.append(f"weight strategy {strategy!r} (supported: group, channel)")
    actorder = weights.get("actorder")
    if actorder not in (None, "group", "weight", False):
        problems.append(f"actorder {actorder!r} (supported: group, weight, none)")
    if problems:
        raise ValueError(f"compressed-tensors scheme weights={weights}, input_activations="
                         f"{group.get('input_activations')} is not supported: {'; '.join(problems)}.")
    size = int(weights.get("group_size") or -1) if strategy == "group" else -1
    if size != -1 and size <= 0:
        raise ValueError(f"compressed-tensors group_size {size} is not valid.")
    return size, actorder == "group"

