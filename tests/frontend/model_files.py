"""Model directories for frontend and server tests: SmolLM2's real tokenizer, optionally with tiny random weights.

The tokenizer comes from ``tests/data/smollm2-135m`` (tokenizer.json stored gzipped).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

_SOURCES = [Path(__file__).resolve().parents[1] / "data" / "smollm2-135m"]
_TOKENIZER_FILES = ["tokenizer_config.json", "chat_template.jinja", "generation_config.json"]


def _source() -> Path:
    for src in _SOURCES:
        if (src / "tokenizer.json").is_file() or (src / "tokenizer.json.gz").is_file():
            return src
    raise FileNotFoundError(f"SmolLM2 tokenizer files not found in any of {_SOURCES}")


def copy_tokenizer_files(dest: Path) -> Path:
    """Put SmolLM2's tokenizer files (tokenizer.json unzipped) into ``dest``."""
    src = _source()
    dest.mkdir(parents=True, exist_ok=True)
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", dest / "tokenizer.json")
    else:
        with gzip.open(src / "tokenizer.json.gz", "rb") as f, open(dest / "tokenizer.json", "wb") as out:
            shutil.copyfileobj(f, out)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    return dest


def tokenizer_dir(dest: Path) -> Path:
    """A directory with SmolLM2's tokenizer (for ``AutoTokenizer.from_pretrained``)."""
    if not (dest / "tokenizer.json").is_file():
        copy_tokenizer_files(dest)
        shutil.copyfile(_source() / "config.json", dest / "config.json")
    return dest


def tiny_llama_dir(dest: Path, seed: int = 0) -> Path:
    """A Llama with random weights (2 layers, hidden 64) and SmolLM2's vocabulary and tokenizer: fast on CPU."""
    import torch
    import transformers

    if (dest / "config.json").is_file():
        return dest
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True, initializer_range=0.2, rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dest)
    copy_tokenizer_files(dest)
    return dest
