"""One tokenizer call per engine step for every sequence that advanced, instead of two per sequence.

Incremental detokenization decodes a small window of ids per new token (``frontend/detokenizer.py``); at 256
streams that is 512 Python->Rust calls a step. ``BatchDecoder.predecode`` gathers the windows of every sequence
that got exactly one new token this step, decodes them with the Rust tokenizer's ``decode_batch`` (one call per
``skip_special_tokens`` setting) and hands each sequence its texts; ``decode_next`` then uses them instead of
calling the tokenizer. The text is the same as the per-sequence path's (tested). Sequences with several new tokens
(speculative decoding) or deferred text take the per-sequence path. Opt-in (``PAGEDSERVE_BATCH_DETOKENIZE=1``):
on a busy 2-core machine rayon's ``decode_batch`` came out slower than the per-sequence calls.
"""

from __future__ import annotations

from typing import Any

from ipc.messages import EngineOutput, FinishReason


class BatchDecoder:
    def __init__(self, backend: Any) -> None:
        self._backend = backend

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> "BatchDecoder | None":
        """A decoder over the tokenizer's Rust backend, or None when it has no ``decode_batch``."""
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is None and hasattr(tokenizer, "get_vocab_size"):
            backend = tokenizer  # a bare tokenizers.Tokenizer
        if backend is None or not hasattr(backend, "decode_batch"):
            return None
        return cls(backend)

    def predecode(self, outputs: list[EngineOutput], requests: dict[str, Any]) -> None:
        """Decode this step's windows in one call per skip_special_tokens setting; each sequence keeps its texts."""
        groups: dict[bool, tuple[list, list[list[int]]]] = {}
        for out in outputs:
            req = requests.get(out.request_id)
            seqs = getattr(req, "seqs", None)
            if seqs is None or out.index >= len(seqs):
                continue
            seq = seqs[out.index]
            text = seq.text
            if text is None or seq.finished:
                continue
            windows = text.windows_for(out.new_token_ids, out.finish_reason == FinishReason.STOP)
            if windows is None:
                continue
            owners, all_windows = groups.setdefault(text.skip_special_tokens, ([], []))
            owners.append((text, len(windows)))
            all_windows.extend(windows)
        for skip_special_tokens, (owners, all_windows) in groups.items():
            texts = self._backend.decode_batch(all_windows, skip_special_tokens=skip_special_tokens)
            start = 0
            for text, count in owners:
                text.set_predecoded(texts[start : start + count])
                start += count
