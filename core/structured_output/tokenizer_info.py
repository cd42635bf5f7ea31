"""The xgrammar view of the model's vocabulary, built on the compiler thread the first time a grammar is needed."""

from __future__ import annotations

from typing import Any

from core.model_source import ModelSource
from core.tokenizer import load_tokenizer


def load_tokenizer_info(source: ModelSource, tokenizer: str | None, vocab_size: int,
                        eos_token_ids: list[int]) -> Any:
    """``TokenizerInfo`` over the model's full vocabulary (logit rows are ``vocab_size`` wide, which may exceed
    the tokenizer's length: the extra ids are never allowed), with the model's EOS ids as the grammar's stop tokens.

    ``source`` and ``tokenizer`` (an override, ``EngineConfig.tokenizer``) are what the frontend loads its tokenizer
    from, so both processes see the same vocabulary.
    """
    import xgrammar as xgr

    hf_tokenizer = load_tokenizer(source, tokenizer)
    return xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                              stop_token_ids=sorted(eos_token_ids))
