"""The xgrammar view of the model's vocabulary, built on the compiler thread the first time a grammar is needed."""

from __future__ import annotations

from typing import Any

from ipc.messages import EngineConfig
from ipc.model_source import resolve_model


def load_tokenizer_info(config: EngineConfig, vocab_size: int, eos_token_ids: list[int]) -> Any:
    """``TokenizerInfo`` over the model's full vocabulary (logit rows are ``vocab_size`` wide, which may exceed
    the tokenizer's length: the extra ids are never allowed), with the model's EOS ids as the grammar's stop tokens.
    """
    import xgrammar as xgr

    # The tokenizer loader (and its converted-GGUF cache) lives in the frontend; the core borrows it rather than
    # keep a second copy. It needs neither torch nor the frontend's server pieces.
    from frontend.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(config.model), config.tokenizer)
    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_token_ids))
