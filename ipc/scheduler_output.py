"""The scheduler -> runner contract: one ``SchedulerOutput`` per step, built by the engine core and applied by every
runner (in the engine-core process with one device; in each worker process with tensor/pipeline parallelism).

It carries diffs, not state: a sequence's prompt, sampling parameters and block ids travel once, when it is
(re)scheduled; afterwards a step sends only the tokens and block ids it gained. Each runner keeps a persistent batch
(core/worker_batch.py) from these diffs and never reads the scheduler's or the KV manager's Python objects.

Sequences are named by a *slot*: a small integer the engine gives a sequence when the runners first see it (and
frees when they forget it), which is also its row in every runner's block table. Per-row data travels as columns
(one list per field, in batch order), not one struct per row: a decode step of 256 sequences is a few flat lists of
ints to build, encode, decode and apply.
"""

from __future__ import annotations

import msgspec

from ipc.messages import SamplingParams


class NewSequenceData(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    """A sequence the runner has not seen, or one coming back after preemption: everything it needs once."""

    request_id: str
    index: int
    slot: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens sampled before a preemption (empty for a new sequence)
    sampling_params: SamplingParams
    block_ids: list[int]
    prompt_logprobs_done: bool = True  # False: prompt logprobs are still owed (index 0 asked for them)


class BlockTableChange(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A known sequence's block list changed (sent only then: a block boundary crossed, or blocks given back): cut
    it to ``keep`` ids, then append ``new_block_ids``."""

    slot: int
    keep: int
    new_block_ids: list[int] = []


class SchedulerOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    """One step. Apply order: drop ``finished_slots``, add ``new_sequences``, append the tokens, apply the block
    changes, then run the rows. ``finished_slots`` holds every sequence the runner should forget (finished, aborted,
    preempted); a slot freed there may be given to a new sequence in the same message.

    Rows (one entry per scheduled sequence, batch order): compute ``num_tokens[i]`` tokens of sequence
    ``slots[i]`` from position ``starts[i]``; ``samples[i]``: the step reaches the end of its tokens, and its last
    logits are sampled as output token ``output_indices[i]``; ``spec_token_ids[i]``: drafts verified after its last
    token (the list is empty, not a list of empty lists, when no row has drafts)."""

    slots: list[int] = []
    starts: list[int] = []
    num_tokens: list[int] = []
    samples: list[bool] = []
    output_indices: list[int] = []
    spec_token_ids: list[list[int]] = []
    new_sequences: list[NewSequenceData] = []
    # Tokens known sequences gained: ``appended_counts[i]`` ids of ``appended_token_ids`` (flat) for
    # ``appended_slots[i]`` (``appended_counts`` is empty when every count is 1, the usual decode step).
    appended_slots: list[int] = []
    appended_counts: list[int] = []
    appended_token_ids: list[int] = []
    block_changes: list[BlockTableChange] = []
    finished_slots: list[int] = []
    total_num_tokens: int = 0

    @property
    def num_rows(self) -> int:
        return len(self.slots)


# Pipeline parallelism: the message telling the first stage's workers to sample the oldest micro-batch they have in
# flight, as the engine does next (the vocabulary-parallel LM head's gather pairs across that stage's ranks). A
# msgpack nil: never a valid encoded ``SchedulerOutput``.
FINISH_OLDEST_STEP = b"\xc0"

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SchedulerOutput)


def encode_scheduler_output(out: SchedulerOutput) -> bytes:
    return _encoder.encode(out)


def decode_scheduler_output(data: bytes | memoryview) -> SchedulerOutput:
    return _decoder.decode(data)
