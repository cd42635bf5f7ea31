"""Request sets for the serving benchmark: random, shared-prefix and JSONL files.

Every synthetic prompt is built in token space and then checked through the tokenizer (decode, re-encode, fix up),
so the server sees exactly the requested number of prompt tokens, as vLLM's random dataset does. All draws come from
one ``numpy.random.default_rng(seed)``: the same seed gives the same requests, byte for byte.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_MAX_FIXUP_ROUNDS = 16


@dataclass
class SampleRequest:
    """One request to send. ``prompt`` is text (completions); ``messages`` is a chat conversation (chat endpoint)."""

    prompt: str
    prompt_len: int
    expected_output_len: int
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = field(default=None, repr=False)


class BenchTokenizer:
    """The few tokenizer operations the benchmark needs, over a Hugging Face-style tokenizer."""

    def __init__(self, tokenizer: Any):
        self.inner = tokenizer
        special = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
        vocab_size = int(tokenizer.vocab_size)
        ids = np.arange(vocab_size, dtype=np.int64)
        self.sampleable_ids = ids[~np.isin(ids, np.fromiter(special, dtype=np.int64, count=len(special)))]
        counter = getattr(tokenizer, "num_special_tokens_to_add", None)
        self.num_special_tokens = int(counter()) if callable(counter) else 0

    def encode(self, text: str) -> list[int]:
        return list(self.inner.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """One call for many texts: fast tokenizers encode a batch in parallel threads."""
        if not texts:
            return []
        return [list(ids) for ids in self.inner(texts, add_special_tokens=False)["input_ids"]]

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return list(self.inner.batch_decode(batch)) if batch else []

    def count(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """Render a conversation as the completions prompt the model's chat template gives."""
        return self.inner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def exact_length_prompt(
    tokenizer: BenchTokenizer, rng: np.random.Generator, target_len: int, head: list[int] | None = None
) -> tuple[str, list[int], bool]:
    """Text whose encoding is exactly ``target_len`` tokens and starts with the ids ``head``; see the batch version."""
    texts, ids, exact = exact_length_prompts(tokenizer, rng, [target_len], [list(head or [])])
    return texts[0], ids[0], exact[0]


def exact_length_prompts(
    tokenizer: BenchTokenizer, rng: np.random.Generator, targets: list[int], heads: list[list[int]]
) -> tuple[list[str], list[list[int]], list[bool]]:
    """Texts whose encodings are exactly ``targets[i]`` tokens and start with the ids ``heads[i]``.

    Random ids rarely survive decode/re-encode unchanged (merges across token boundaries, partial UTF-8), so re-encode,
    keep what came back, trim or top up the tail with fresh draws, and repeat until it is a fixed point. All prompts
    go through each round together, so the tokenizer encodes them in one parallel batch.
    Returns (texts, ids, exact); ``exact[i]`` is False only when no fixed point was found (counted by the caller).
    """
    tail_lens = [t - len(h) for t, h in zip(targets, heads)]
    if min(tail_lens, default=0) < 0:
        raise ValueError("a prefix is longer than its prompt's target length")
    tails = [_draw(tokenizer, rng, n) for n in tail_lens]
    texts: list[str] = [""] * len(targets)
    ids: list[list[int]] = [[] for _ in targets]
    exact = [False] * len(targets)
    pending = list(range(len(targets)))
    for _ in range(_MAX_FIXUP_ROUNDS):
        if not pending:
            break
        round_texts = tokenizer.decode_batch([heads[i] + tails[i] for i in pending])
        round_ids = tokenizer.encode_batch(round_texts)
        still = []
        for i, text, got in zip(pending, round_texts, round_ids):
            head, tail_len = heads[i], tail_lens[i]
            texts[i], ids[i] = text, got
            if got[: len(head)] != head:  # the tail merged into the head's last token: start the tail again
                tail = []
            elif len(got) == targets[i]:
                exact[i] = True
                continue
            else:
                tail = got[len(head) :][:tail_len]
            if len(tail) < tail_len:
                tail += _draw(tokenizer, rng, tail_len - len(tail))
            tails[i] = tail
            still.append(i)
        pending = still
    return texts, ids, exact


def _draw(tokenizer: BenchTokenizer, rng: np.random.Generator, n: int) -> list[int]:
    if n <= 0:
        return []
    picks = rng.integers(0, len(tokenizer.sampleable_ids), size=n)
    return tokenizer.sampleable_ids[picks].tolist()


def _length_range(mean: int, range_ratio: float, floor_at_one: bool) -> tuple[int, int]:
    low = math.floor(mean * (1.0 - range_ratio))
    high = math.ceil(mean * (1.0 + range_ratio))
    if floor_at_one:
        low, high = max(low, 1), max(high, 1)
    return low, high


def random_requests(
    tokenizer: BenchTokenizer,
    num_requests: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
) -> list[SampleRequest]:
    """vLLM's ``random`` dataset: a fixed random prefix, then lengths uniform in [len*(1-r), len*(1+r)].

    As in vLLM, the tokens the server adds itself (BOS...) are taken off ``input_len`` so the server's count matches.
    """
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    rng = np.random.default_rng(seed)
    real_input_len = max(0, input_len - tokenizer.num_special_tokens)
    in_low, in_high = _length_range(real_input_len, range_ratio, floor_at_one=False)
    out_low, out_high = _length_range(output_len, range_ratio, floor_at_one=True)
    if prefix_len + in_low < 1:
        raise ValueError("--random-input-len (plus --random-prefix-len) must give at least one prompt token")
    input_lens = rng.integers(in_low, in_high + 1, size=num_requests)
    output_lens = rng.integers(out_low, out_high + 1, size=num_requests)
    prefix_ids: list[int] = []
    if prefix_len > 0:
        _, prefix_ids, _ = exact_length_prompt(tokenizer, rng, prefix_len)
    lens_in = input_lens.tolist()
    texts, ids, exact = exact_length_prompts(
        tokenizer, rng, [len(prefix_ids) + n for n in lens_in], [prefix_ids] * num_requests)
    _warn_inexact(exact.count(False))
    return [SampleRequest(text, len(tok), n_out, prompt_token_ids=tok)
            for text, tok, n_out in zip(texts, ids, output_lens.tolist())]


def prefix_repetition_requests(
    tokenizer: BenchTokenizer,
    num_requests: int,
    prefix_len: int,
    suffix_len: int,
    num_prefixes: int,
    output_len: int,
    seed: int = 0,
    shuffle: bool = True,
) -> list[SampleRequest]:
    """vLLM's ``prefix_repetition``: ``num_prefixes`` shared prefixes, each followed by distinct random suffixes.

    Unlike vLLM, exactly ``num_requests`` requests come out (prefixes are dealt round-robin), and the prefix is
    identical in token space in every prompt that shares it, so a prefix cache can hit.
    """
    if num_prefixes < 1:
        raise ValueError("--prefix-repetition-num-prefixes must be at least 1")
    if num_requests < num_prefixes:
        raise ValueError(f"--num-prompts ({num_requests}) must be at least the number of prefixes ({num_prefixes})")
    rng = np.random.default_rng(seed)
    if prefix_len > 0:
        prefixes = exact_length_prompts(tokenizer, rng, [prefix_len] * num_prefixes, [[]] * num_prefixes)[1]
    else:
        prefixes = [[] for _ in range(num_prefixes)]
    heads = [prefixes[i % num_prefixes] for i in range(num_requests)]
    texts, ids, exact = exact_length_prompts(tokenizer, rng, [len(h) + suffix_len for h in heads], heads)
    requests = [SampleRequest(text, len(tok), output_len, prompt_token_ids=tok) for text, tok in zip(texts, ids)]
    if shuffle:
        order = rng.permutation(num_requests)
        requests = [requests[i] for i in order]
    _warn_inexact(exact.count(False))
    return requests


def custom_requests(
    tokenizer: BenchTokenizer,
    path: str | Path,
    num_requests: int,
    output_len: int,
    chat: bool,
    apply_chat_template: bool = True,
    seed: int = 0,
    shuffle: bool = True,
) -> list[SampleRequest]:
    """A JSONL file, one request a line: ``{"prompt": "..."}`` or ``{"messages": [{"role": ..., "content": ...}]}``.

    An optional ``output_tokens`` (or ``max_tokens``) per line overrides ``output_len``. For the completions endpoint,
    plain prompts get the model's chat template unless ``apply_chat_template`` is False (vLLM's
    ``--skip-chat-template``), and conversations always do. The file is shuffled with the seed, then cycled or cut
    to ``num_requests``.
    """
    rows = _read_jsonl(Path(path))
    if not rows:
        raise ValueError(f"{path} holds no requests")
    order = np.random.default_rng(seed).permutation(len(rows)) if shuffle else np.arange(len(rows))
    requests = []
    for i in range(num_requests):
        row = rows[int(order[i % len(rows)])]
        n_out = int(row.get("output_tokens") or row.get("max_tokens") or output_len)
        messages = row.get("messages") or row.get("conversations")
        if messages is not None:
            messages = [_normalise_message(m) for m in messages]
            prompt = tokenizer.chat_prompt(messages)
        else:
            prompt = row.get("prompt")
            if not isinstance(prompt, str):
                raise ValueError(f"{path}: each line needs a 'prompt' string or a 'messages' list, got {sorted(row)}")
            messages = [{"role": "user", "content": prompt}]
            if apply_chat_template and not chat:
                prompt = tokenizer.chat_prompt(messages)
        prompt_len = tokenizer.count(prompt)
        requests.append(SampleRequest(prompt, prompt_len, n_out, messages=messages if chat else None))
    return requests


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            if isinstance(row, str):
                row = {"prompt": row}
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected an object or a string")
            rows.append(row)
    return rows


def _normalise_message(message: dict[str, Any]) -> dict[str, Any]:
    """Accept ShareGPT-style ``{"from": "human", "value": ...}`` as well as OpenAI ``{"role", "content"}``."""
    if "role" in message:
        return {"role": message["role"], "content": message.get("content", "")}
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    return {"role": roles.get(message.get("from", "user"), "user"), "content": message.get("value", "")}


def _warn_inexact(count: int) -> None:
    if count:
        warnings.warn(
            f"{count} prompt(s) could not be made to re-encode to their exact token length through this tokenizer",
            stacklevel=3,
        )
