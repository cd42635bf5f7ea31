"""The model's tokenizer (and chat template): one loader for the frontend (text in and out, the chat template) and
the core (the vocabulary its grammar compiler needs, ``core/structured_output/tokenizer_info.py``).

Lives in ``core`` beside ``model_source`` and, like it, stays import-light (no torch, no model code;
transformers is imported only when a tokenizer is loaded) so the frontend imports it too.

GGUF models carry their tokenizer inside the file; transformers converts it in ~15 s, so the converted tokenizer
is saved once under ``$PAGEDSERVE_CACHE_DIR/tokenizers/<key>`` (default ``~/.cache/pagedserve``) and later loads
take a fraction of a second. The key covers the file's path, size and mtime and the transformers version, so a
changed file or converter gets a fresh entry; an entry that fails to load is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from core import envs
from core.model_source import ModelSource, resolve_model

logger = logging.getLogger(__name__)


def load_tokenizer(source: ModelSource, tokenizer: str | None = None, chat_template: str | None = None):
    """A transformers tokenizer for ``source`` (or for ``tokenizer``: a directory, .gguf file or hub id).

    ``chat_template`` (a file path or an inline Jinja string) replaces the tokenizer's own template.
    """
    if tokenizer is not None and Path(tokenizer).is_dir():
        tok = _load_directory_tokenizer(Path(tokenizer))  # tokenizer files alone: no model config needed
    else:
        if tokenizer is not None:
            source = resolve_model(tokenizer)
        tok = _load_gguf_tokenizer(Path(source.gguf_file)) if source.is_gguf else _load_directory_tokenizer(source.path)
    if chat_template is not None:
        tok.chat_template = read_chat_template(chat_template)
    _disable_backend_padding(tok)
    return tok


def _disable_backend_padding(tok) -> None:
    """Some tokenizer.json files (sentence-transformers' all-MiniLM-L6-v2) switch on fixed padding and truncation
    (to 128) in the Rust tokenizer. transformers' wrapper overrides them on every call, but ``encode`` below calls
    the Rust tokenizer directly: turn them off there, so it returns exactly the prompt's tokens."""
    backend = getattr(tok, "_tokenizer", None)
    if backend is not None and hasattr(backend, "no_padding"):
        backend.no_padding()
        backend.no_truncation()


def encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """``tokenizer.encode(text)`` through the Rust tokenizer directly when there is one: the same ids, without
    transformers' Python wrapper, which costs ~2 ms for a 512-token prompt and blocks the server's event loop."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return backend.encode(text, add_special_tokens=add_special_tokens).ids
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def read_chat_template(chat_template: str) -> str:
    """The template text of ``chat_template``: the contents of a file, else the string itself if it is Jinja."""
    try:
        path = Path(os.path.expanduser(chat_template))
        if path.is_file():
            return path.read_text()
    except OSError:  # an inline template too long to be a file name
        pass
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    raise ValueError(f"chat_template '{chat_template}' is neither a file nor a Jinja template.")


def cache_root() -> Path:
    return envs.cache_dir()


def gguf_tokenizer_cache_dir(gguf_file: Path) -> Path:
    """Where the converted tokenizer of ``gguf_file`` is cached."""
    import transformers

    gguf_file = gguf_file.resolve()
    stat = gguf_file.stat()
    identity = f"{gguf_file}|{stat.st_size}|{stat.st_mtime_ns}|transformers-{transformers.__version__}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:20]
    return cache_root() / "tokenizers" / f"{gguf_file.stem}-{digest}"


def _from_pretrained(path: str | Path, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)


def _load_directory_tokenizer(path: str):
    try:
        return _from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"Cannot load a tokenizer from {path}: {exc}. Pass a directory with tokenizer files as `tokenizer`."
        ) from exc


def _convert_gguf_tokenizer(gguf_file: Path):
    """The slow path: transformers rebuilds a fast tokenizer from the GGUF's vocabulary and merges."""
    return _from_pretrained(gguf_file.parent, gguf_file=str(gguf_file))


def _load_gguf_tokenizer(gguf_file: Path):
    cache = gguf_tokenizer_cache_dir(gguf_file)
    if cache.is_dir():
        try:
            return _from_pretrained(cache)
        except Exception as exc:  # corrupt or partial entry: rebuild it
            logger.warning("Cached tokenizer %s is unreadable (%s); rebuilding it.", cache, exc)
            shutil.rmtree(cache, ignore_errors=True)
    logger.info("Converting the tokenizer of %s (once; cached in %s).", gguf_file, cache)
    tok = _convert_gguf_tokenizer(gguf_file)
    _save_atomically(tok, cache)
    return tok


def _save_atomically(tok, cache: Path) -> None:
    """Save into a temporary sibling and rename, so a crash or a concurrent process never leaves half an entry."""
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cache)
    except OSError as exc:  # read-only cache, or another process won the race: the tokenizer still works
        if not cache.is_dir():
            logger.warning("Could not cache the tokenizer in %s: %s", cache, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
