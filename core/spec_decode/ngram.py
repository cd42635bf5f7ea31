"""Prompt-lookup (n-gram) proposer: the longest suffix n-gram of a sequence (``prompt_lookup_max`` down to
``prompt_lookup_min`` tokens) that also occurs earlier in its prompt + output proposes the tokens that followed that
earlier occurrence (the most recent one on ties).

Host-side numpy over a persistent ``[rows, max_model_len]`` token buffer, one row per sequence, updated with only the
tokens a step appended; the search is batched over all proposing sequences (one comparison pass over the buffer window,
then the candidates only), so its host cost is a handful of numpy ops per step whatever the batch size.

A handful of numpy ops is still most of a speculative step's host time when one or two sequences decode (the
single-stream latency speculation is for), and with text that repeats, the candidates to check grow with the
context: batches of at most ``SMALL_BATCH`` sequences use an incremental index per sequence instead (``SuffixIndex``:
a dict per n-gram length from each n-gram to its latest end), a few dict operations per appended token and per
lookup. Both give the same drafts.
"""

from __future__ import annotations

import numpy as np

from core.input_batch import SequenceRows


# Proposing batches up to this size use the per-sequence incremental index (O(new tokens) per step, whatever the
# number of earlier matches; CPU, tiny llama, repeated text, 16 sequences: 0.4-0.5 ms per step against 1.4-1.6 for
# the numpy search); larger ones the batched numpy search, which keeps no per-n-gram state (the index holds
# (nmax - nmin + 1) dict entries per token of each indexed sequence).
SMALL_BATCH = 32


class SuffixIndex:
    """One sequence's n-grams of lengths ``nmin..nmax`` mapped to the latest (or, ``first``, the earliest) position
    right after an occurrence that has a continuation (``end <= len(tokens) - 1``), updated with the tokens appended
    since the last call."""

    __slots__ = ("nmin", "nmax", "first", "latest_end", "indexed")

    def __init__(self, nmin: int, nmax: int, first: bool = False) -> None:
        self.nmin = nmin
        self.nmax = nmax
        self.first = first
        self.latest_end: list[dict[tuple[int, ...], int]] = [{} for _ in range(nmax + 1)]  # by n
        self.indexed = 0  # ends below this are in the index (ends < len(tokens) at the last update)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """The drafts ``propose_batch`` gives for ``tokens``: the continuation (up to ``k`` tokens) of the latest
        (``first``: earliest) earlier occurrence of the longest suffix n-gram (``nmax`` down to ``nmin``)."""
        length = len(tokens)
        nmin, nmax, latest_end = self.nmin, self.nmax, self.latest_end
        for n in range(nmin, nmax + 1):
            # The ends the new tokens make (each has a continuation): n-gram tokens[end - n : end] for end in
            # [start, length - 1], built by zipping n shifted slices (C loops; later ends overwrite earlier ones).
            start = max(self.indexed, n)
            if start < length:
                shifted = [tokens[start - n + i : length - n + i] for i in range(n)]
                if self.first:  # keep the earliest end: new n-grams only, the earliest of a repeat written last
                    ends = latest_end[n]
                    new = [(gram, end) for gram, end in zip(zip(*shifted), range(start, length)) if gram not in ends]
                    ends.update(reversed(new))
                else:
                    latest_end[n].update(zip(zip(*shifted), range(start, length)))
        self.indexed = max(self.indexed, length)
        for n in range(min(nmax, length), nmin - 1, -1):
            end = latest_end[n].get(tuple(tokens[length - n :]))
            if end is not None:
                return tokens[end : min(end + k, length)]
        return []


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int,
                 max_num_seqs: int, max_model_len: int, occurrence: str = "latest") -> None:
        """``occurrence``: which earlier occurrence of the matched n-gram proposes when there are several,
        "latest" or "first"."""
        if occurrence not in ("latest", "first"):
            raise ValueError(f"occurrence must be 'latest' or 'first', got {occurrence!r}")
        self.first = occurrence == "first"
        self.k = num_speculative_tokens
        self.nmin = prompt_lookup_min
        self.nmax = prompt_lookup_max
        self._rows = SequenceRows(np.zeros((max_num_seqs, max_model_len), dtype=np.int32))
        self.tokens = self._rows.buffer
        self._indexes: dict[tuple[str, int], SuffixIndex] = {}  # sequences proposed in small batches

    def remove(self, keys: list[tuple[str, int]]) -> None:
        self._rows.remove(keys)
        for key in keys:
            self._indexes.pop(key, None)

    def propose(self, sequences: list[tuple[tuple[str, int], list[int]]]) -> list[list[int]]:
        """Drafts (up to k tokens, maybe none) for each (key, all token ids)."""
        if not sequences:
            return []
        if len(sequences) <= SMALL_BATCH:
            indexes = self._indexes
            out = []
            for key, tokens in sequences:
                index = indexes.get(key)
                if index is None:
                    index = indexes[key] = SuffixIndex(self.nmin, self.nmax, self.first)
                out.append(index.propose(tokens, self.k))
            return out
        rows = np.fromiter((self._rows.sync(key, tokens) for key, tokens in sequences), dtype=np.int64,
                           count=len(sequences))
        lengths = np.fromiter((len(tokens) for _, tokens in sequences), dtype=np.int64, count=len(sequences))
        return propose_batch(self.tokens[rows, : int(lengths.max())], lengths, self.k, self.nmin, self.nmax,
                             first=self.first)


def propose_batch(window: np.ndarray, lengths: np.ndarray, k: int, nmin: int, nmax: int, first: bool = False
                  ) -> list[list[int]]:
    """``window[i, :lengths[i]]``: sequence i's tokens. A candidate end ``e`` (an earlier n-gram occupies
    ``[e - n, e)``, followed by token ``e``) matches ``n`` when its ``n`` tokens before ``e`` equal the sequence's last
    ``n``; the best candidate has the longest match (>= nmin, up to nmax), the latest (``first``: earliest) on ties.

    One full pass finds the candidates whose previous token equals the last token (few, in practice); the longer
    matches are checked on those candidates only."""
    num_seqs, width = window.shape
    empty: list[list[int]] = [[] for _ in range(num_seqs)]
    if width < 2:
        return empty
    seq_index = np.arange(num_seqs)
    last = window[seq_index, lengths - 1]
    eq = window[:, : width - 1] == last[:, None]  # column c: candidate e = c + 1
    row, col = np.divmod(np.flatnonzero(eq), width - 1)
    end = col + 1
    keep = end < lengths[row]  # a continuation exists (and e = L would be the suffix itself)
    row, end = row[keep], end[keep]
    if not len(row):
        return empty
    run = np.ones(len(row), dtype=np.int64)
    alive = np.ones(len(row), dtype=bool)
    for m in range(2, nmax + 1):
        pos = end - m
        suffix_pos = lengths[row] - m
        ok = alive & (pos >= 0) & (suffix_pos >= 0)
        same = np.zeros(len(row), dtype=bool)
        same[ok] = window[row[ok], pos[ok]] == window[row[ok], suffix_pos[ok]]
        alive = same
        if not alive.any():
            break
        run += alive
    good = run >= nmin
    row, end, run = row[good], end[good], run[good]
    if not len(row):
        return empty
    # per row: the last entry has the longest run, then the latest (first: earliest) end
    order = np.lexsort((-end if first else end, run, row))
    last_of_row = np.ones(len(order), dtype=bool)
    last_of_row[:-1] = row[order][1:] != row[order][:-1]
    out = empty
    for i in order[last_of_row]:
        r, e = int(row[i]), int(end[i])
        out[r] = window[r, e : min(e + k, int(lengths[r]))].tolist()
    return out
