"""Model files -> an HF config dict and a stream of HF-named CPU tensors.

The model (``core/models``) owns parameter layout (merging q/k/v, gate/up); the loader only finds files and
yields ``(hf_name, tensor)`` one at a time, so a checkpoint never sits in memory twice. Random (dummy) weights
are the model's job, not the loader's.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from core.compressed_sparsity import compressed_sparsity, decompress_weights
from core.gguf import GGUFFile, hf_config_from_gguf, iter_gguf_weights
from core.model_source import ModelSource
from ipc.config import WEIGHT_FORMATS

LOAD_FORMATS = ("auto", *WEIGHT_FORMATS)  # ``dummy`` never reaches the loader: the model makes its own weights

# Buffers some old checkpoints saved that are computed by the model, never loaded.
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


@lru_cache(maxsize=2)
def _open_gguf(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str) -> GGUFFile:
    """One parsed header per file (config and weights are read from the same file at startup)."""
    stat = Path(path).stat()
    return _open_gguf(path, stat.st_size, stat.st_mtime_ns)


def load_hf_config(source: ModelSource) -> dict[str, Any]:
    """The model's HF ``config.json`` as a dict; for GGUF, rebuilt from the file's metadata.

    For directories, ``eos_token_id`` from ``generation_config.json`` wins over config.json's: instruct models
    list their end-of-turn tokens there (a list when there are several); an NVIDIA ModelOpt ``hf_quant_config.json``
    becomes the ``quantization_config`` when config.json has none.
    """
    if source.is_gguf:
        return hf_config_from_gguf(open_gguf(source.gguf_file))
    directory = Path(source.path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json.")
    config = json.loads(config_path.read_text())
    modelopt_path = directory / "hf_quant_config.json"  # older NVIDIA ModelOpt exports keep their scheme apart
    if "quantization_config" not in config and modelopt_path.is_file():
        scheme = json.loads(modelopt_path.read_text()).get("quantization") or {}
        config["quantization_config"] = {"quant_method": "modelopt", **scheme}
    generation_path = directory / "generation_config.json"
    if generation_path.is_file():
        eos = json.loads(generation_path.read_text()).get("eos_token_id")
        if eos is not None:
            config["eos_token_id"] = eos
    return config


def iter_weights(source: ModelSource, load_format: str = "auto", keep_quantized: Collection[str] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """Yield ``(hf_name, cpu_tensor)`` for every weight of the checkpoint, one tensor at a time.

    Dtypes: safetensors/pt tensors keep the checkpoint's dtype; GGUF tensors are dequantized to float32, except
    those named in ``keep_quantized`` (HF names; ``core/layers/quantization/gguf.py``): their raw uint8 blocks.
    The format and the files are checked now (ValueError / FileNotFoundError), not at the first ``next()``.
    """
    load_format = resolve_load_format(source, load_format)
    if load_format == "gguf":
        gguf = open_gguf(_gguf_path(source))
        hf_config_from_gguf(gguf)  # rejects unsupported architectures up front
        return iter_gguf_weights(gguf, keep_quantized or ())
    directory = Path(source.path)
    if load_format == "safetensors":
        weights = _iter_files(safetensors_files(directory), _iter_safetensors_file)
    else:
        weights = _iter_files(pt_files(directory), _iter_pt_file)
    if compressed_sparsity(load_hf_config(source)):  # sparse weights stored compressed: dense ones from here on
        return decompress_weights(weights)
    return weights


def _iter_files(files: list[Path], reader) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        for name, tensor in reader(file):
            if not name.endswith(_SKIPPED_SUFFIXES):
                yield name, tensor


def resolve_load_format(source: ModelSource, load_format: str = "auto") -> str:
    """Validate ``load_format`` and turn ``auto`` into the format the source's files are in."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"Unknown load_format '{load_format}'; choose one of {', '.join(LOAD_FORMATS)}.")
    if load_format != "auto":
        return load_format
    if source.is_gguf:
        return "gguf"
    directory = Path(source.path)
    if any(directory.glob("*.safetensors")):
        return "safetensors"
    if any(directory.glob("pytorch_model*.bin")):
        return "pt"
    if any(directory.glob("*.gguf")):
        return "gguf"
    raise FileNotFoundError(f"No weights in {directory}: no *.safetensors, pytorch_model*.bin or *.gguf file.")


def _gguf_path(source: ModelSource) -> str:
    if source.gguf_file:
        return source.gguf_file
    ggufs = sorted(Path(source.path).glob("*.gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(f"load_format=gguf needs exactly one .gguf file in {source.path}, found {len(ggufs)}.")
    return str(ggufs[0])


def _files_from_index(directory: Path, index_name: str) -> list[Path] | None:
    index = directory / index_name
    if not index.is_file():
        return None
    weight_map = json.loads(index.read_text())["weight_map"]
    return [directory / name for name in sorted(set(weight_map.values()))]


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, else model.safetensors, else every file.

    The index (or model.safetensors) wins so that repos shipping a second copy of the weights in another
    layout (Mistral's consolidated.safetensors) are not loaded twice.
    """
    files = _files_from_index(directory, "model.safetensors.index.json")
    if files is None:
        single = directory / "model.safetensors"
        files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors files in {directory}.")
    return files


def pt_files(directory: Path) -> list[Path]:
    files = _files_from_index(directory, "pytorch_model.bin.index.json") or sorted(
        directory.glob("pytorch_model*.bin")
    )
    if not files:
        raise FileNotFoundError(f"No pytorch_model*.bin files in {directory}.")
    return files


def _iter_safetensors_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _iter_pt_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    try:
        yield from state.items()
    finally:
        del state
