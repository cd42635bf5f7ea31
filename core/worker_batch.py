"""A runner's persistent batch: every live sequence's tokens, sampling parameters and block ids, kept from the
engine's ``SchedulerOutput`` diffs (ipc/scheduler_output.py). The runner reads only this, never the scheduler's
``Sequence`` objects or the KV manager, so the same code runs in the engine-core process and in worker processes.
"""

from __future__ import annotations

import numpy as np

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
    """Live sequences by slot, and a block-table row per sequence: row = slot (the engine picks slots, so applying a
    step needs no key lookups; block ids are copied only when a sequence's block list changed)."""

    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, eos_token_ids: frozenset[int]) -> None:
        self.block_table = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)
        self.eos_token_ids = eos_token_ids
        self.by_slot: list[BatchSequence | None] = [None] * max_num_seqs
        self.sequences: dict[tuple[str, int], BatchSequence] = {}

    def apply(self, out: SchedulerOutput) -> list[BatchSequence]:
        """Fold one step's diffs in; returns the scheduled sequences in batch order."""
        by_slot = self.by_slot
        for slot in out.finished_slots:
            seq = by_slot[slot]
            if seq is not None:
                by_slot[slot] = None
                del self.sequences[seq.key]
        for data in out.new_sequences:
            seq = BatchSequence(data, self.eos_token_ids)
            if not 0 <= data.slot < len(by_slot):
                raise RuntimeError(f"scheduler output puts sequence {seq.key} in slot {data.slot}, outside this "
                                   f"runner's {len(by_slot)} rows")
            if seq.key in self.sequences or by_slot[data.slot] is not None:
                raise RuntimeError(f"scheduler output adds sequence {seq.key} (slot {data.slot}) twice")
            self.sequences[seq.key] = seq
            by_slot[data.slot] = seq
            self.block_table[data.slot, : len(seq.block_ids)] = seq.block_ids
        if not out.appended_counts:  # one token each (the usual decode step)
            for seq, token_id in zip(map(by_slot.__getitem__, out.appended_slots), out.appended_token_ids):
                seq.all_token_ids.append(token_id)
        else:
            offset = 0
            flat = out.appended_token_ids
            for slot, count in zip(out.appended_slots, out.appended_counts):
                by_slot[slot].all_token_ids.extend(flat[offset : offset + count])
                offset += count
        for change in out.block_changes:
            seq = by_slot[change.slot]
            del seq.block_ids[change.keep :]
            seq.block_ids.extend(change.new_block_ids)
            self.block_table[change.slot, change.keep : len(seq.block_ids)] = change.new_block_ids
        return list(map(by_slot.__getitem__, out.slots))

    def rows(self, out: SchedulerOutput) -> np.ndarray:
        """The scheduled sequences' block-table rows, in batch order."""
        return np.asarray(out.slots, dtype=np.int64)
