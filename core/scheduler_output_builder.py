"""Engine side of the scheduler -> runner contract: turns the scheduler's step (``Sequence`` objects, KV blocks)
into the compact ``SchedulerOutput`` message of diffs every runner applies (ipc/scheduler_output.py).

It remembers, per sequence the runners know, its slot and how many tokens and block ids they were sent, so each step
carries only what changed: a sequence's prompt and parameters travel when it is (re)scheduled, then only appended
tokens, and block ids when its block list changed. Per-row data goes out as columns (a hot loop: every running
sequence, every step).
"""

from __future__ import annotations

from core.kv_cache import KVBlock
from core.scheduler import SchedulerOutput as ScheduledStep
from ipc.scheduler_output import BlockTableChange, NewSequenceData, SchedulerOutput


class SchedulerOutputBuilder:
    def __init__(self, speculative: bool = True) -> None:
        """``speculative``: steps may carry drafts (False skips looking for them: a pass over the batch)."""
        self.speculative = speculative
        # key -> [slot, tokens sent, block ids sent, the KV manager's block list], also kept on the Sequence
        # (``runner_state``: no key lookups per step). The KV manager extends and cuts a sequence's block list in
        # place until it frees it, which forgets the sequence here (slot -1: a Sequence still holding the state
        # is sent anew).
        self._sent: dict[tuple[str, int], list] = {}
        self._finished_slots: list[int] = []  # to forget, sent with the next message
        self._free_slots: list[int] = []
        self._trimmed: set[tuple[str, int]] = set()  # gave blocks back: the next change cuts the runners' list
        self._num_slots = 0

    def forget(self, keys: list[tuple[str, int]]) -> None:
        """Sequences freed (finished, aborted, preempted): the runners drop them with the next message, and their
        slots go to later sequences."""
        for key in keys:
            sent = self._sent.pop(key, None)
            if sent is not None:
                self._trimmed.discard(key)
                self._finished_slots.append(sent[0])
                self._free_slots.append(sent[0])
                sent[0] = -1

    def trim_blocks(self, key: tuple[str, int], num_blocks: int) -> None:
        """The sequence gave blocks back (rejected drafts): the next message cuts its list to ``num_blocks``."""
        sent = self._sent.get(key)
        if sent is not None and sent[2] > num_blocks:
            sent[2] = num_blocks
            self._trimmed.add(key)

    def slot(self, key: tuple[str, int]) -> int | None:
        """The sequence's slot (its block-table row in every runner), None when the runners do not know it."""
        sent = self._sent.get(key)
        return None if sent is None else sent[0]

    def _new_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        self._num_slots += 1
        return self._num_slots - 1

    def build(self, step: ScheduledStep, blocks: dict[tuple[str, int], list[KVBlock]]) -> SchedulerOutput:
        scheduled = step.scheduled
        new: list[NewSequenceData] = []
        slots: list[int] = []
        appended_slots: list[int] = []
        appended_counts: list[int] = []  # filled only once some sequence gained more than one token
        appended_token_ids: list[int] = []
        changes: list[BlockTableChange] = []
        sent_by_key = self._sent
        trimmed = self._trimmed
        for s in scheduled:  # locals only: this runs for every running sequence, every step
            seq = s.seq
            tokens = seq.all_token_ids
            num_tokens = len(tokens)
            sent = seq.runner_state
            if sent is None or sent[0] < 0:
                key = seq.key
                seq_blocks = blocks[key]
                slot = self._new_slot()
                new.append(NewSequenceData(
                    request_id=seq.request_id, index=seq.index, slot=slot, prompt_token_ids=seq.prompt_token_ids,
                    output_token_ids=tokens[seq.num_prompt_tokens :], sampling_params=seq.sampling_params,
                    block_ids=[b.block_id for b in seq_blocks], prompt_logprobs_done=seq.prompt_logprobs_done))
                sent_by_key[key] = seq.runner_state = [slot, num_tokens, len(seq_blocks), seq_blocks]
                slots.append(slot)
                continue
            slot = sent[0]
            slots.append(slot)
            have = sent[1]
            if have < num_tokens:
                if have + 1 == num_tokens and not appended_counts:
                    appended_token_ids.append(tokens[have])
                else:
                    if not appended_counts:
                        appended_counts = [1] * len(appended_slots)
                    appended_token_ids.extend(tokens[have:])
                    appended_counts.append(num_tokens - have)
                appended_slots.append(slot)
                sent[1] = num_tokens
            seq_blocks = sent[3]
            if sent[2] != len(seq_blocks) or (trimmed and seq.key in trimmed):
                num_blocks = len(seq_blocks)
                trimmed.discard(seq.key)
                keep = min(sent[2], num_blocks)
                changes.append(BlockTableChange(slot, keep, [b.block_id for b in seq_blocks[keep:]]))
                sent[2] = num_blocks
        spec = [s.spec_token_ids for s in scheduled] if self.speculative else []
        finished, self._finished_slots = self._finished_slots, []
        return SchedulerOutput(
            slots=slots, starts=[s.start for s in scheduled], num_tokens=[s.num_tokens for s in scheduled],
            samples=[s.samples for s in scheduled], output_indices=[s.output_index for s in scheduled],
            spec_token_ids=spec if any(spec) else [], new_sequences=new, appended_slots=appended_slots,
            appended_counts=appended_counts, appended_token_ids=appended_token_ids,
            block_changes=changes, finished_slots=finished, total_num_tokens=step.total_num_tokens)
