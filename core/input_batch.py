"""The persistent batch: a row per running sequence holding its block table, kept across steps.

Each step applies only the scheduler's changes: new rows for sequences that (re)start, the block ids a sequence
gained, rows dropped for sequences that finished or were preempted. The per-step work left is a numpy gather of
the scheduled rows into pinned staging buffers.
"""

from __future__ import annotations

import numpy as np
import torch

from core.kv_cache import KVBlock


class SequenceRows:
    """A row per live sequence in a ``[max_num_seqs, width]`` buffer, filled incrementally: ``sync`` copies only the
    items a sequence gained since its last sync. The persistent batch keeps block ids this way, the n-gram proposer
    token ids."""

    def __init__(self, buffer: np.ndarray) -> None:
        self.buffer = buffer
        self._count = [0] * buffer.shape[0]  # items in each row (a list: cheaper than numpy scalars per call)
        self.row_of: dict[tuple[str, int], int] = {}
        self._free_rows = list(range(buffer.shape[0] - 1, -1, -1))

    def remove(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            row = self.row_of.pop(key, None)
            if row is not None:
                self._count[row] = 0
                self._free_rows.append(row)

    def truncate(self, key: tuple[str, int], count: int) -> None:
        """The sequence lost items from its end: the next ``sync`` rewrites the row from ``count`` on."""
        row = self.row_of.get(key)
        if row is not None and self._count[row] > count:
            self._count[row] = count

    def sync(self, key: tuple[str, int], items: list, to_value=None) -> int:
        """The sequence's row (created on first sight) holding all of ``items``; ``to_value`` maps the new items to
        what the buffer stores."""
        row = self.row_of.get(key)
        if row is None:
            row = self._free_rows.pop()
            self.row_of[key] = row
        have = self._count[row]
        if have < len(items):
            new = items[have:]
            self.buffer[row, have : len(items)] = new if to_value is None else [to_value(x) for x in new]
            self._count[row] = len(items)
        return row


def _block_id(block: KVBlock) -> int:
    return block.block_id


class InputBatch:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, pin_memory: bool) -> None:
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_table = torch.zeros((max_num_seqs, max_blocks_per_seq), dtype=torch.int32,
                                       pin_memory=pin_memory).numpy()
        self._rows = SequenceRows(self.block_table)
        self.remove = self._rows.remove
        self.truncate = self._rows.truncate  # (key, num_blocks): blocks given back (rejected drafts)

    def row(self, key: tuple[str, int], blocks: list[KVBlock]) -> int:
        """The sequence's row, created on first sight, with any block ids it gained since the last step."""
        return self._rows.sync(key, blocks, _block_id)
