"""The scheduler -> runner contract: one ``SchedulerOutput`` per step, built by the engine core and applied by every
runner (in the engine-core process with one device; in each worker process with tensor/pipeline parallelism).

It carries diffs, not state: a sequence's prompt, sampling parameters and block ids travel once, when it is
(re)scheduled; afterwards a step sends only the tokens and block ids it gained. Each runner keeps a persistent batch
(core/worker_batch.py) from these diffs and never reads the scheduler's or the KV manager's Python objects.
"""

from __future__ import annotations

import msgspec

from ipc.messages import SamplingParams


class NewSequenceData(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    """A sequence the runner has not seen, or one coming back after preemption: everything it needs once."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens sampled before a preemption (empty for a new sequence)
    sampling_params: SamplingParams
    block_ids: list[int]
    prompt_logprobs_done: bool = True  # False: prompt logprobs are still owed (index 0 asked for them)


class CachedSequenceData(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    """What a known sequence gained since it was last scheduled. ``block_ids_from``: its block list is cut to this
    length before ``new_block_ids`` are appended (rejected drafts give blocks back)."""

    request_id: str
    index: int
    new_token_ids: list[int] = []
    block_ids_from: int = 0
    new_block_ids: list[int] = []


class ScheduledTokens(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    """One row of the step's batch, in batch order: compute ``num_tokens`` from position ``start``."""

    request_id: str
    index: int
    start: int
    num_tokens: int
    samples: bool = False  # the step reaches the end of the sequence's tokens: its last logits are sampled
    output_index: int = 0  # index, in the sequence's output, of the token sampled
    spec_token_ids: list[int] = []  # drafts verified this step (after the last token)


class SchedulerOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    """One step. Apply order: drop ``finished_keys``, add ``new_sequences``, apply ``cached_sequences``, then run
    ``scheduled``. ``finished_keys`` holds every sequence the runner should forget (finished, aborted, preempted)."""

    scheduled: list[ScheduledTokens] = []
    new_sequences: list[NewSequenceData] = []
    cached_sequences: list[CachedSequenceData] = []
    finished_keys: list[tuple[str, int]] = []
    total_num_tokens: int = 0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SchedulerOutput)


def encode_scheduler_output(out: SchedulerOutput) -> bytes:
    return _encoder.encode(out)


def decode_scheduler_output(data: bytes | memoryview) -> SchedulerOutput:
    return _decoder.decode(data)
