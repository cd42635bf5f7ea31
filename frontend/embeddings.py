"""Embedding helpers shared by ``/v1/embeddings`` and the offline ``LLM.embed``: input truncation, the
``dimensions`` rule (Matryoshka models only), turning the core's float32 bytes into vectors, and the offline
output types (vLLM's ``EmbeddingRequestOutput`` shape)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ipc.messages import EmbeddingInfo


class EmbeddingInputError(ValueError):
    """Bad embedding input; ``param`` names the offending field for the OpenAI error body."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True


def check_dimensions(dimensions: int | None, info: EmbeddingInfo, model: str) -> None:
    """``dimensions`` is honoured only for Matryoshka models (truncating other models' vectors gives poor results)."""
    if dimensions is None:
        return
    if not info.is_matryoshka:
        raise EmbeddingInputError(f"Model '{model}' does not support matryoshka representation: changing output "
                                  "dimensions would give poor results, so 'dimensions' is not accepted.", "dimensions")
    if not 1 <= dimensions <= info.size:
        raise EmbeddingInputError(f"dimensions must be in [1, {info.size}], got {dimensions}.", "dimensions")
    if info.matryoshka_dimensions and dimensions not in info.matryoshka_dimensions:
        raise EmbeddingInputError(f"Model '{model}' supports dimensions {info.matryoshka_dimensions}, "
                                  f"got {dimensions}.", "dimensions")


def to_vector(raw: bytes, dimensions: int | None, info: EmbeddingInfo) -> np.ndarray:
    """The core's float32 bytes as a vector, cut to ``dimensions`` (renormalised when the model normalises)."""
    vector = np.frombuffer(raw, dtype=np.float32)
    if dimensions is not None and dimensions < vector.shape[0]:
        vector = vector[:dimensions]
        if info.normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return vector


def check_truncate(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """The token count to truncate to (None: no truncation; -1: the model's maximum)."""
    if truncate_prompt_tokens is None:
        return None
    if truncate_prompt_tokens == -1:
        return max_model_len
    if not 1 <= truncate_prompt_tokens <= max_model_len:
        raise EmbeddingInputError(f"truncate_prompt_tokens must be -1 or in [1, {max_model_len}], "
                                  f"got {truncate_prompt_tokens}.", "truncate_prompt_tokens")
    return truncate_prompt_tokens


def tokenize_truncated(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    """Tokenize with the tokenizer's own truncation (its side; special tokens such as [SEP] kept)."""
    return list(tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"])


def check_length(token_ids: list[int], max_model_len: int, index: int | None = None) -> None:
    where = "" if index is None else f" (input {index})"
    if not token_ids:
        raise EmbeddingInputError(f"The input{where} is empty.", "input")
    if len(token_ids) > max_model_len:
        raise EmbeddingInputError(
            f"The input{where} has {len(token_ids)} tokens, more than the model's maximum of {max_model_len}. "
            "Shorten it, or pass truncate_prompt_tokens to truncate it.", "input")
