"""The persistent batch: a row per running sequence holding its block table, kept across steps.

Each step applies only the scheduler's changes: new rows for sequences that (re)start, the block ids a sequence
gained, rows dropped for sequences that finished or were preempted. The per-step work left is a numpy gather of
the scheduled rows into pinned staging buffers.
"""

from __future__ import annotations

import numpy as np
import torch

from core.kv_cache import KVBlock


class InputBatch:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, pin_memory: bool) -> None:
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_table = torch.zeros((max_num_seqs, max_blocks_per_seq), dtype=torch.int32,
                                       pin_memory=pin_memory).numpy()
        self.num_blocks = np.zeros(max_num_seqs, dtype=np.int32)
        self.row_of: dict[tuple[str, int], int] = {}
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))

    def remove(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            row = self.row_of.pop(key, None)
            if row is not None:
                self.num_blocks[row] = 0
                self._free_rows.append(row)

    def truncate(self, key: tuple[str, int], num_blocks: int) -> None:
        """The sequence gave blocks back (rejected drafts): the next ``row`` call rewrites the ids from there."""
        row = self.row_of.get(key)
        if row is not None and self.num_blocks[row] > num_blocks:
            self.num_blocks[row] = num_blocks

    def row(self, key: tuple[str, int], blocks: list[KVBlock]) -> int:
        """The sequence's row, created on first sight, with any block ids it gained since the last step."""
        row = self.row_of.get(key)
        if row is None:
            row = self._free_rows.pop()
            self.row_of[key] = row
        have = self.num_blocks[row]
        if have < len(blocks):
            self.block_table[row, have : len(blocks)] = [b.block_id for b in blocks[have:]]
            self.num_blocks[row] = len(blocks)
        return row
