"""Incremental detokenization and stop strings: turns a sequence's token ids into text as they arrive.

Decoding a growing sequence token by token with ``decode([id])`` is wrong twice over: a multi-byte UTF-8
character split across tokens comes out as U+FFFD, and tokenizers whose decoders depend on neighbours
(SentencePiece's leading-space rule, WordPiece's ``##``) spell tokens differently alone. So each step decodes a
small window of recent tokens twice (without and with the new ones) and emits the difference, holding text back
while it ends in an incomplete character (the prefix-offset / read-offset scheme of HF TGI and vLLM).
"""

from __future__ import annotations

from typing import Any, Callable

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as left context for the first output token (enough for any decoder's look-behind and
# for a 4-byte character split over four byte tokens).
_PROMPT_CONTEXT_TOKENS = 6


def _decode_fn(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """The fastest correct decode: the Rust tokenizer directly when there is one (3x faster than HF's wrapper)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and hasattr(backend, "get_vocab_size"):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    if hasattr(tokenizer, "get_vocab_size"):  # a bare ``tokenizers.Tokenizer``
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def added_token_strings(tokenizer: Any) -> dict[int, str]:
    """id -> content of the tokenizer's added (special and user-added) tokens, cached on the tokenizer."""
    cached = getattr(tokenizer, "_pagedserve_added_tokens", None)
    if cached is not None:
        return cached
    backend = getattr(tokenizer, "_tokenizer", None) or tokenizer
    if hasattr(backend, "get_added_tokens_decoder"):
        added = {tid: tok.content for tid, tok in backend.get_added_tokens_decoder().items()}
    elif hasattr(tokenizer, "added_tokens_decoder"):
        added = {tid: str(tok) for tid, tok in tokenizer.added_tokens_decoder.items()}
    else:
        added = {}
    try:
        tokenizer._pagedserve_added_tokens = added
    except AttributeError:  # a Rust object that takes no attributes: recompute next time
        pass
    return added


class IncrementalDetokenizer:
    """Decodes one sequence's output tokens one at a time; ``decode_next`` returns the newly complete text."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._decode = _decode_fn(tokenizer, skip_special_tokens)
        # A window of token ids: [prefix_offset, read_offset) is text already emitted (left context),
        # [read_offset, end) tokens not yet emitted (an incomplete character).
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None
        # vLLM's rule for fast tokenizers: with spaces_between_special_tokens=False, a special token that
        # follows another is spelled bare (decoders such as WordPiece would put a space before it).
        self._added_tokens: dict[int, str] | None = None
        if not skip_special_tokens and not spaces_between_special_tokens:
            self._added_tokens = added_token_strings(tokenizer) or None
        self._last_was_added = False
        self._predecoded: list[str] | None = None
        self.skip_special_tokens = skip_special_tokens

    def windows_for(self, token_id: int) -> list[list[int]]:
        """The id lists ``decode_next(token_id)`` will decode, in order: for a batched decode of many sequences
        (``set_predecoded`` hands the texts back)."""
        if self._prefix_text is None:
            prefix = self._ids[self._prefix_offset : self._read_offset]
            return [prefix, prefix + [token_id]]
        return [self._ids[self._prefix_offset :] + [token_id]]

    def set_predecoded(self, texts: list[str]) -> None:
        """Texts of ``windows_for``'s lists, decoded elsewhere: the next ``decode_next`` uses them."""
        self._predecoded = texts[::-1]

    def _decode_window(self, ids: list[int]) -> str:
        if self._predecoded:
            return self._predecoded.pop()
        return self._decode(ids)

    def decode_next(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._prefix_text is None:
            self._prefix_text = self._decode_window(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode_window(self._ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            # Nothing new yet, or the new bytes end mid-character: wait for the next token.
            delta = ""
        else:
            delta = new_text[len(self._prefix_text) :]
            self._advance()
        if self._added_tokens is not None:
            special = self._added_tokens.get(token_id)
            if special is not None and self._last_was_added and delta:
                delta = special
            self._last_was_added = special is not None
        return delta

    def flush(self) -> str:
        """Text of tokens still held back (a sequence that ended mid-character): emitted as decoded, U+FFFD and all."""
        if self._read_offset == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        delta = self._decode(self._ids[self._prefix_offset :])[len(self._prefix_text) :]
        self._advance()
        return delta

    def _advance(self) -> None:
        # Keep only the last emitted stretch as context; drop older ids so the window stays small.
        del self._ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = None


class StopStringMatcher:
    """Finds the earliest stop string in a growing text, looking only where new text could complete one."""

    def __init__(self, stop: list[str], include_in_output: bool) -> None:
        self.stop = [s for s in stop if s]
        self.include_in_output = include_in_output
        self._max_len = max((len(s) for s in self.stop), default=0)

    def __bool__(self) -> bool:
        return bool(self.stop)

    def find(self, text: str, new_chars: int) -> tuple[str, int] | None:
        """(stop string, length to cut the text to) if a stop string ends inside the last ``new_chars`` chars."""
        if not self.stop or new_chars <= 0:
            return None
        start = max(0, len(text) - new_chars - self._max_len + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        pos, s = best
        return s, (pos + len(s) if self.include_in_output else pos)

    def holdback(self, text: str) -> int:
        """How many trailing chars could be the start of a stop string (and so must not be streamed yet)."""
        if self.include_in_output or not self.stop:
            return 0
        # Per stop string, the earliest place in the last chars where its first char starts a prefix of it: one
        # str.find per candidate start instead of a slice and a startswith per tail length.
        best = 0
        for s in self.stop:
            span = min(len(s), self._max_len - 1)
            window = text[max(0, len(text) - span):] if span > 0 else ""
            i = window.find(s[0])
            while i != -1 and len(window) - i > best:
                if s.startswith(window[i:]):
                    best = len(window) - i
                    break
                i = window.find(s[0], i + 1)
        return best


class SequenceText:
    """The text side of one sequence: incremental decoding, stop strings, and how much may be streamed.

    ``deferred=True`` (offline generation without stop strings: nobody looks at the text before the end)
    decodes once when the sequence finishes instead of twice per token; the text is the same.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: list[str],
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        min_tokens: int = 0,
        deferred: bool = False,
    ) -> None:
        self._detok = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, skip_special_tokens, spaces_between_special_tokens
        )
        # Deferred decoding needs no per-token text: not with stop strings, nor with vLLM's per-token
        # special-token spacing rule.
        self._deferred: list[int] | None = None
        if deferred and not stop and (skip_special_tokens or spaces_between_special_tokens):
            self._deferred = []
            self._decode = _decode_fn(tokenizer, skip_special_tokens)
            self._context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._stops = StopStringMatcher(stop, include_stop_str_in_output)
        self._include_stop_token = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._num_tokens = 0
        self.text = ""
        self.stop_string: str | None = None

    def add_tokens(self, token_ids: list[int], stop_token_terminated: bool = False) -> str | None:
        """Decode new tokens; returns the stop string if one was hit (the text is then cut before it).

        ``stop_token_terminated``: the core ended the sequence on its last token (EOS or a stop token id);
        like vLLM, that token's text is left out unless ``include_stop_str_in_output``.
        """
        if stop_token_terminated and not self._include_stop_token and token_ids:
            token_ids = token_ids[:-1]
        if self._deferred is not None:
            self._deferred.extend(token_ids)
            return None
        before = len(self.text)
        check_from = before
        pieces = []
        for token_id in token_ids:
            pieces.append(self._detok.decode_next(token_id))
            self._num_tokens += 1
            if self._num_tokens <= self._min_tokens:
                check_from = before + sum(len(p) for p in pieces)  # no stop string within min_tokens
        if pieces:
            self.text += "".join(pieces)
        if self._stops and self._num_tokens > self._min_tokens:
            hit = self._stops.find(self.text, len(self.text) - check_from)
            if hit is not None:
                self.stop_string, cut = hit
                self.text = self.text[:cut]
                return self.stop_string
        return None

    def windows_for(self, token_ids: list[int], stop_token_terminated: bool = False) -> list[list[int]] | None:
        """What ``add_tokens`` would decode for one new token (for a batched decode across sequences), or None
        when it decodes nothing or several tokens (those take the per-sequence path)."""
        if self._deferred is not None or len(token_ids) != 1 or (stop_token_terminated and not
                                                                  self._include_stop_token):
            return None
        return self._detok.windows_for(token_ids[0])

    def set_predecoded(self, texts: list[str]) -> None:
        self._detok.set_predecoded(texts)

    @property
    def skip_special_tokens(self) -> bool:
        return self._detok.skip_special_tokens

    def finish(self) -> None:
        """The sequence ended: add text held back for an incomplete final character (or decode it all)."""
        if self._deferred is not None:
            # What the incremental decoder would have produced: the text after the prompt context.
            context_len = len(self._decode(self._context))
            self.text = self._decode(self._context + self._deferred)[context_len:]
            self._deferred = []
        elif self.stop_string is None:
            self.text += self._detok.flush()

    def visible_len(self, finished: bool) -> int:
        """Length of the text that may be shown now: all of it once finished, else minus a possible stop prefix."""
        if finished:
            return len(self.text)
        return len(self.text) - self._stops.holdback(self.text)
