"""A runner's persistent batch: every live sequence's tokens, sampling parameters and block ids, kept from the
engine's ``SchedulerOutput`` diffs (ipc/scheduler_output.py). The runner reads only this, never the scheduler's
``Sequence`` objects or the KV manager, so the same code runs in the engine-core process and in worker processes.
"""

from __future__ import annotations

import numpy as np

from core.input_batch import SequenceRows
from core.sequence import seed_key
from ipc.messages import SamplingParams
from ipc.scheduler_output import NewSequenceData, SchedulerOutput


class BatchSequence:
    """The runner's view of one sequence: what sampling, prompt logprobs and input building read. Attribute names
    match ``core.sequence.Sequence``'s, so the sampler's helpers take either."""

    __slots__ = ("request_id", "index", "key", "prompt_token_ids", "all_token_ids", "num_prompt_tokens",
                 "sampling_params", "stop_token_ids", "eos_token_ids", "seed_key", "block_ids",
                 "prompt_logprobs_done")

    def __init__(self, data: NewSequenceData, eos_token_ids: frozenset[int]) -> None:
        self.request_id = data.request_id
        self.index = data.index
        self.key = (data.request_id, data.index)
        self.prompt_token_ids = data.prompt_token_ids
        self.all_token_ids = [*data.prompt_token_ids, *data.output_token_ids]
        self.num_prompt_tokens = len(data.prompt_token_ids)
        params: SamplingParams = data.sampling_params
        self.sampling_params = params
        self.stop_token_ids = frozenset(params.stop_token_ids or ())
        self.eos_token_ids = eos_token_ids
        self.seed_key = seed_key(params.seed)
        self.block_ids = list(data.block_ids)
        self.prompt_logprobs_done = data.prompt_logprobs_done

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]


class WorkerBatch:
    """Live sequences by key, and a block-table row per sequence (synced incrementally: only new block ids are
    copied)."""

    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, eos_token_ids: frozenset[int]) -> None:
        self.block_table = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)
        self._rows = SequenceRows(self.block_table)
        self.eos_token_ids = eos_token_ids
        self.sequences: dict[tuple[str, int], BatchSequence] = {}

    def apply(self, out: SchedulerOutput) -> list[BatchSequence]:
        """Fold one step's diffs in; returns the scheduled sequences in batch order."""
        keys = [tuple(k) for k in out.finished_keys]
        for key in keys:
            self.sequences.pop(key, None)
        self._rows.remove(keys)
        for data in out.new_sequences:
            seq = BatchSequence(data, self.eos_token_ids)
            if seq.key in self.sequences:
                raise RuntimeError(f"scheduler output adds sequence {seq.key} twice")
            self.sequences[seq.key] = seq
        for diff in out.cached_sequences:
            seq = self.sequences[(diff.request_id, diff.index)]
            seq.all_token_ids.extend(diff.new_token_ids)
            if diff.block_ids_from < len(seq.block_ids):
                del seq.block_ids[diff.block_ids_from :]
                self._rows.truncate(seq.key, diff.block_ids_from)
            seq.block_ids.extend(diff.new_block_ids)
        return [self.sequences[(s.request_id, s.index)] for s in out.scheduled]

    def row(self, seq: BatchSequence) -> int:
        """The sequence's block-table row, holding all of its block ids."""
        return self._rows.sync(seq.key, seq.block_ids)
