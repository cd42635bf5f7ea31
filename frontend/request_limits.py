"""Bounds every request is checked against before any costly work: the wire format, the model, the server's caps.

Why here and early: a value the core cannot hold (an int over 64 bits, a token id outside the vocabulary) must
become this request's HTTP 400, not a crashed engine step; and a request that is bound to be refused (n of 2**70,
a 20 MB prompt for a 2,048-token model) must be refused before it costs memory or event-loop time.
"""

from __future__ import annotations

from typing import Any

from frontend.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_PROMPT_BATCH = 2048  # OpenAI's limit on the number of prompts in one completions request
DEFAULT_MAX_N = 128  # OpenAI's limit on n
# seed is hashed, not put in a tensor: it may use the full unsigned range (checked by SamplingParams).
_UNSIGNED_64 = frozenset({"seed"})


def max_token_chars(tokenizer: Any | None) -> int:
    """The most characters one token stands for (the longest vocabulary entry): a text longer than
    ``max_model_len * max_token_chars`` surely has more than ``max_model_len`` tokens, so it can be refused
    without tokenizing it. Byte-level and SentencePiece vocabularies spell a token with at least as many
    characters as it decodes to, so the bound is safe."""
    if tokenizer is None:
        return 0
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a readable vocabulary: no character bound
        return 0
    return max((len(token) for token in vocab), default=0)


def check_int_ranges(request: Any) -> None:
    """Every integer the request carries (top level, and in lists such as token ids) fits in int64."""
    for name, value in request.__dict__.items():
        if name == "prompt" and isinstance(value, list) and value and isinstance(value[0], list):
            values = [v for row in value for v in row]
        elif isinstance(value, list):
            values = value
        else:
            values = [value]
        high = 2**64 - 1 if name in _UNSIGNED_64 else INT64_MAX
        ints = [v for v in values[:1] + values[-1:] if isinstance(v, int) and not isinstance(v, bool)]
        if not ints:
            continue
        if len(values) > 2 and all(type(v) is int for v in (values[0], values[-1])):
            try:  # a validated list[int]: min/max run in C (a 100,000-id prompt must not hold the event loop)
                values = [min(values), max(values)]
            except TypeError:
                pass
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and not INT64_MIN <= v <= high:
                raise OpenAIError(f"{name} is out of range: {v} does not fit in a 64-bit integer.", param=name)


def check_request_limits(request: CompletionRequest | ChatCompletionRequest, *, max_n: int, vocab_size: int,
                         max_prompt_chars: int | None) -> None:
    """The checks that need only the request and the model's sizes; run before tokenizing or rendering."""
    if request.n > max_n:
        raise OpenAIError(f"n must be at most {max_n} (the server's --max-n), got {request.n}.", param="n")
    if request.best_of is not None and request.best_of > max_n:
        raise OpenAIError(f"best_of must be at most {max_n}, got {request.best_of}.", param="best_of")
    if isinstance(request, CompletionRequest) and isinstance(request.prompt, list) and request.prompt \
            and not isinstance(request.prompt[0], int) and len(request.prompt) > MAX_PROMPT_BATCH:
        raise OpenAIError(f"A request may hold at most {MAX_PROMPT_BATCH} prompts, got {len(request.prompt)}.",
                          param="prompt")
    check_int_ranges(request)
    if request.stop_token_ids:
        bad = [t for t in request.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise OpenAIError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {bad[0]}.",
                              param="stop_token_ids")
    if max_prompt_chars:
        check_prompt_chars(request, max_prompt_chars)


def check_prompt_chars(request: Any, max_prompt_chars: int) -> None:
    """Refuse a text that cannot fit the context before tokenizing it (which would block for seconds)."""
    if isinstance(request, ChatCompletionRequest) or hasattr(request, "messages"):
        total = sum(_content_chars(m.content) for m in request.messages)
        param = "messages"
    else:
        prompt = request.prompt
        texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
        total = max((len(t) for t in texts), default=0)
        param = "prompt"
    if total > max_prompt_chars:
        raise OpenAIError(
            f"The input has {total} characters, more than this model's context can hold ({max_prompt_chars} "
            "characters at most). Please reduce the length of the input.", param=param)


def _content_chars(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    return sum(len(part.get("text") or "") if isinstance(part.get("text"), str) else 0 for part in content)
