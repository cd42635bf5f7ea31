"""Prompt-lookup (n-gram) proposer: the longest suffix n-gram of a sequence (``prompt_lookup_max`` down to
``prompt_lookup_min`` tokens) that also occurs earlier in its prompt + output proposes the tokens that followed that
earlier occurrence (the most recent one on ties).

Host-side numpy over a persistent ``[rows, max_model_len]`` token buffer, one row per sequence, updated with only the
tokens a step appended; the search is batched over all proposing sequences (``nmax`` shifted comparisons of the
buffer window), so its host cost is a handful of numpy ops per step whatever the batch size.
"""

from __future__ import annotations

import numpy as np


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int,
                 max_num_seqs: int, max_model_len: int) -> None:
        self.k = num_speculative_tokens
        self.nmin = prompt_lookup_min
        self.nmax = prompt_lookup_max
        self.tokens = np.zeros((max_num_seqs, max_model_len), dtype=np.int32)
        self.lengths = np.zeros(max_num_seqs, dtype=np.int64)
        self.row_of: dict[tuple[str, int], int] = {}
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))

    def remove(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            row = self.row_of.pop(key, None)
            if row is not None:
                self.lengths[row] = 0
                self._free_rows.append(row)

    def _sync(self, key: tuple[str, int], token_ids: list[int]) -> int:
        """The sequence's row, holding all its tokens (only the new ones are copied)."""
        row = self.row_of.get(key)
        if row is None:
            row = self._free_rows.pop()
            self.row_of[key] = row
        have = int(self.lengths[row])
        if have < len(token_ids):
            self.tokens[row, have : len(token_ids)] = token_ids[have:]
            self.lengths[row] = len(token_ids)
        return row

    def propose(self, sequences: list[tuple[tuple[str, int], list[int]]]) -> list[list[int]]:
        """Drafts (up to k tokens, maybe none) for each (key, all token ids)."""
        if not sequences:
            return []
        rows = np.fromiter((self._sync(key, tokens) for key, tokens in sequences), dtype=np.int64,
                           count=len(sequences))
        return propose_batch(self.tokens[rows[:, None], np.arange(int(self.lengths[rows].max()))[None, :]],
                             self.lengths[rows], self.k, self.nmin, self.nmax)


def propose_batch(window: np.ndarray, lengths: np.ndarray, k: int, nmin: int, nmax: int) -> list[list[int]]:
    """``window[i, :lengths[i]]``: sequence i's tokens. For each candidate end ``e`` (an earlier n-gram occupies
    ``[e - n, e)`` and is followed by token ``e``), the match length is the number of trailing tokens it shares with the
    sequence's suffix; the best ``e`` has the longest match (>= nmin, capped at nmax), the latest on ties."""
    num_seqs, width = window.shape
    if width < 2:
        return [[] for _ in range(num_seqs)]
    cols = np.arange(width)
    matching = (cols[None, :] < lengths[:, None] - 0)  # e < L: a continuation exists and it is not the suffix itself
    run = np.zeros((num_seqs, width), dtype=np.int64)
    for m in range(1, nmax + 1):
        suffix_pos = lengths - m
        ok_len = suffix_pos >= 1  # the suffix n-gram must fit, with e - m >= 0 below
        suffix_tok = window[np.arange(num_seqs), np.maximum(suffix_pos, 0)]
        eq = np.zeros((num_seqs, width), dtype=bool)
        eq[:, m:] = window[:, : width - m] == suffix_tok[:, None]
        matching &= eq & ok_len[:, None]
        if not matching.any():
            break
        run += matching
    score = np.where(run >= nmin, run * width + cols[None, :], -1)
    best = score.argmax(1)
    found = score[np.arange(num_seqs), best] >= 0
    out: list[list[int]] = []
    for i in range(num_seqs):
        if not found[i]:
            out.append([])
            continue
        e = int(best[i])
        out.append(window[i, e : min(e + k, int(lengths[i]))].tolist())
    return out
