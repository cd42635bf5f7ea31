"""Engine side of the scheduler -> runner contract: turns the scheduler's step (``Sequence`` objects, KV blocks)
into the compact ``SchedulerOutput`` message of diffs every runner applies (ipc/scheduler_output.py).

It remembers, per sequence the runners know, how many tokens and block ids they were sent, so each step carries only
what changed: a sequence's prompt and parameters travel when it is (re)scheduled, then only appended tokens and
block ids.
"""

from __future__ import annotations

from core.kv_cache import KVBlock
from core.scheduler import SchedulerOutput as ScheduledStep
from ipc.scheduler_output import CachedSequenceData, NewSequenceData, ScheduledTokens, SchedulerOutput


class SchedulerOutputBuilder:
    def __init__(self) -> None:
        self._sent: dict[tuple[str, int], list[int]] = {}  # key -> [tokens sent, block ids sent]
        self._finished: list[tuple[str, int]] = []  # to forget, sent with the next message

    def forget(self, keys: list[tuple[str, int]]) -> None:
        """Sequences freed (finished, aborted, preempted): the runners drop them with the next message."""
        for key in keys:
            self._sent.pop(key, None)
        self._finished.extend(keys)

    def trim_blocks(self, key: tuple[str, int], num_blocks: int) -> None:
        """The sequence gave blocks back (rejected drafts): the next message cuts its list to ``num_blocks``."""
        sent = self._sent.get(key)
        if sent is not None and sent[1] > num_blocks:
            sent[1] = num_blocks

    def build(self, step: ScheduledStep, blocks: dict[tuple[str, int], list[KVBlock]]) -> SchedulerOutput:
        new: list[NewSequenceData] = []
        cached: list[CachedSequenceData] = []
        scheduled: list[ScheduledTokens] = []
        sent_by_key = self._sent
        for s in step.scheduled:  # a hot loop (every running sequence, every step): locals, no needless lists
            seq = s.seq
            key = seq.key
            seq_blocks = blocks[key]
            num_blocks = len(seq_blocks)
            tokens = seq.all_token_ids
            sent = sent_by_key.get(key)
            if sent is None:
                new.append(NewSequenceData(
                    request_id=seq.request_id, index=seq.index, prompt_token_ids=seq.prompt_token_ids,
                    output_token_ids=tokens[seq.num_prompt_tokens :], sampling_params=seq.sampling_params,
                    block_ids=[b.block_id for b in seq_blocks], prompt_logprobs_done=seq.prompt_logprobs_done))
                sent_by_key[key] = [len(tokens), num_blocks]
            elif sent[0] < len(tokens) or sent[1] != num_blocks:
                kept = min(sent[1], num_blocks)
                cached.append(CachedSequenceData(
                    request_id=seq.request_id, index=seq.index, new_token_ids=tokens[sent[0] :], block_ids_from=kept,
                    new_block_ids=[b.block_id for b in seq_blocks[kept:]] if kept < num_blocks else []))
                sent[0] = len(tokens)
                sent[1] = num_blocks
            scheduled.append(ScheduledTokens(
                request_id=seq.request_id, index=seq.index, start=s.start, num_tokens=s.num_tokens, samples=s.samples,
                output_index=s.output_index, spec_token_ids=s.spec_token_ids))
        finished, self._finished = self._finished, []
        return SchedulerOutput(scheduled=scheduled, new_sequences=new, cached_sequences=cached,
                               finished_keys=finished, total_num_tokens=step.total_num_tokens)
