"""``--generation-config``: default sampling parameters from a model's ``generation_config.json``, as vLLM does.

``vllm``: none (a request's unset fields take vLLM's defaults; pagedserve's default, today's behaviour). ``auto``:
the model directory's ``generation_config.json``. A folder: that folder's. Only the fields vLLM reads are used,
and only where they differ from transformers' ``GenerationConfig`` defaults (vLLM takes the file's diff).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.model_source import ModelSource

# generation_config.json key -> SamplingParams field
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# transformers' GenerationConfig defaults: a value equal to one of these is not a difference, so not applied
_HF_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


def default_sampling_overrides(setting: str, source: ModelSource | None) -> dict[str, Any]:
    """SamplingParams field -> default, from ``setting`` (``vllm``, ``auto`` or a folder)."""
    if setting == "vllm":
        return {}
    folder = Path(source.path) if setting == "auto" and source is not None else Path(setting)
    path = folder / "generation_config.json"
    if setting == "auto" and (source is None or not path.is_file()):
        return {}  # e.g. a GGUF file: no generation_config.json, no defaults
    if not path.is_file():
        raise ValueError(f"generation_config={setting!r}: {path} does not exist; pass auto, vllm or a folder "
                         "holding generation_config.json.")
    data = json.loads(path.read_text())
    return {ours: data[key] for key, ours in _FIELDS.items()
            if data.get(key) is not None and data[key] != _HF_DEFAULTS.get(key)}
