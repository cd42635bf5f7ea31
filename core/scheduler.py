"""Continuous batching with one token budget per step.

No prefill or decode phases: every running sequence gets the tokens it needs to catch up (1 for a decode, a chunk
for a prefill), running sequences first, then waiting ones in arrival order, up to ``max_num_seqs``. When blocks run
out, the newest running sequence is preempted: its blocks are freed and it is recomputed later (prefix caching
recovers its full blocks). ``num_computed_tokens`` advances when tokens are scheduled, so a sequence scheduled later
in the same step can share blocks being filled now (each layer writes all new KV before any attention reads it).
Pure Python.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from core.kv_cache import KVBlock, KVCacheManager
from core.sequence import Sequence, SequenceStatus
from ipc.messages import FinishReason, SchedulerStats


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (num_computed_tokens before it)
    num_tokens: int
    samples: bool  # the step reaches the end of the sequence's tokens, so its last logits are sampled
    output_index: int  # index in the output of the token sampled (when ``samples``)
    spec_token_ids: list[int] = field(default_factory=list)  # drafts verified this step (after the last token)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # batch row order
    total_num_tokens: int
    preempted: list[Sequence] = field(default_factory=list)
    freed_keys: list[tuple[str, int]] = field(default_factory=list)  # finished/aborted/preempted since last step

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
        async_scheduling: bool = False,
    ) -> None:
        """``async_scheduling``: a step is scheduled while the previous one is still running, so a sequence that
        samples gets a placeholder token, resolved when the step's results arrive."""
        self.kv = kv
        self.async_scheduling = async_scheduling
        self.block_size = kv.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._freed_keys: list[tuple[str, int]] = []
        # stats deltas since the last stats() call
        self._preemptions = 0
        self._batched_tokens = 0  # tokens the latest schedule() put in the step (vllm:iteration_tokens_total)
        self._prefix_queries = 0
        self._prefix_hits = 0
        self.total_preemptions = 0
        self.total_prefix_queries = 0
        self.total_prefix_hits = 0
        self.holds: Callable[[Sequence], bool] | None = None  # a waiting sequence it holds is skipped this step
        # Pipeline parallelism (0: off): steps are micro-batches, this many in flight. A sequence with a step in
        # flight is skipped (its next token is not known yet), and a step takes at most 1/micro_batches of the live
        # sequences, so the running ones split into groups that flow through the stages back to back.
        self.micro_batches = 0
        # Speculative run-ahead (EngineCore._step_run_ahead): a sequence that samples without drafts gets a
        # placeholder for its token in flight, as with async scheduling (a verify step's count is not known ahead:
        # the engine reads its results before scheduling again).
        self.placeholders_for_draftless = False

    # ------------------------------------------------------------------------------------------------ intake
    def add_sequence(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished_sequences(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove a sequence (finished or aborted) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if seq.finish_reason is None:
            seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        self.kv.free(seq)
        self._freed_keys.append(seq.key)

    # ------------------------------------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        max_rows = self._micro_batch_rows() if self.micro_batches else None

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if max_rows is not None:
                if seq.in_flight:
                    i += 1
                    continue
                if len(scheduled) >= max_rows:
                    break
            if seq.num_tokens >= seq.max_total_tokens:
                i += 1  # its last token is being sampled: nothing more to compute
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            drafts = self._schedulable_drafts(seq, budget)
            if drafts and self.kv.allocate_slots(seq, 1 + len(drafts)):
                scheduled.append(self._commit(seq, 1 + len(drafts), drafts))
                budget -= 1 + len(drafts)
                i += 1
                continue
            if not self._allocate_or_preempt(seq, num_new, preempted):
                break  # the sequence preempted itself: nothing newer is left to schedule
            scheduled.append(self._commit(seq, num_new))
            budget -= num_new
            i += 1

        if not preempted:
            budget = self._schedule_waiting(scheduled, budget, max_rows)

        freed, self._freed_keys = self._freed_keys, []
        freed.extend(r.key for r in preempted)
        self._batched_tokens = self.max_num_batched_tokens - budget
        return SchedulerOutput(scheduled, self._batched_tokens, preempted, freed)

    def _micro_batch_rows(self) -> int:
        """Most sequences one micro-batch takes: an equal share of the live ones (at least one)."""
        live = min(self.max_num_seqs, len(self.running) + len(self.waiting))
        return max(1, -(-live // self.micro_batches))

    @staticmethod
    def _schedulable_drafts(seq: Sequence, budget: int) -> list[int]:
        """The drafts a decoding sequence can verify this step: none unless only its last token is left to compute;
        capped so the token after the drafts stays within max_tokens / max_model_len, and by the token budget.
        Drafts never cause a preemption: when their blocks are short, the sequence decodes one token."""
        drafts = seq.spec_token_ids
        if not drafts or seq.num_placeholders or seq.num_computed_tokens != seq.num_tokens - 1:
            return []
        room = min(seq.max_total_tokens - seq.num_tokens - 1, budget - 1)
        return drafts[:room] if room > 0 else []

    def rollback_rejected(self, seq: Sequence, num_rejected: int) -> None:
        """After verification: the rejected drafts' positions are not computed, and blocks beyond what the
        sequence's computed tokens need go back to the pool."""
        seq.num_computed_tokens -= num_rejected
        self.kv.trim(seq, seq.num_computed_tokens)

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, preempted: list[Sequence]) -> bool:
        """Room for a running sequence's tokens, preempting the newest running sequences until it fits; False
        when the sequence itself had to go."""
        while not self.kv.allocate_slots(seq, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, scheduled: list[ScheduledSeq], budget: int, max_rows: int | None = None) -> int:
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and \
                (max_rows is None or len(scheduled) < max_rows):
            seq = self.waiting[0]
            if self.holds is not None and self.holds(seq):  # e.g. its grammar is still compiling
                skipped.append(self.waiting.popleft())
                continue
            shared = self._shared_prefix(seq) if not seq.num_placeholders and not seq.in_flight else None
            if shared is None:  # a fork whose source has not scheduled its prompt yet, or a token still in flight
                # (preempted while its micro-batch is in flight: recomputed once that step's token is in)
                skipped.append(self.waiting.popleft())
                continue
            num_shared_tokens = len(shared) * self.block_size
            num_new = min(seq.num_tokens - seq.num_computed_tokens - num_shared_tokens, budget)
            if not self.kv.allocate_slots(seq, num_new, shared):
                break
            self.waiting.popleft()
            if not seq.prefix_query_counted and seq.fork_source is None:
                # Counted once per sequence, in tokens: a recompute after preemption is never a "hit".
                seq.prefix_query_counted = True
                seq.queue_time_s = time.monotonic() - seq.arrival_time
                seq.num_cached_tokens = num_shared_tokens
                self._prefix_queries += seq.num_tokens
                self._prefix_hits += num_shared_tokens
                self.total_prefix_queries += seq.num_tokens
                self.total_prefix_hits += num_shared_tokens
            seq.num_computed_tokens += num_shared_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._commit(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _shared_prefix(self, seq: Sequence) -> list[KVBlock] | None:
        """Blocks a waiting sequence can reuse: its fork source's prompt blocks, else prefix-cache hits.
        None means "not yet": the fork source has not scheduled its prompt's full blocks."""
        if seq.num_computed_tokens > 0:
            return []
        source = seq.fork_source
        if source is not None:
            num_blocks = (seq.num_tokens - 1) // self.block_size
            if source.status is SequenceStatus.RUNNING:
                if source.num_computed_tokens < num_blocks * self.block_size:
                    return None
                shared = self.kv.blocks(source)[:num_blocks]
                if self.kv.null_block not in shared:
                    return shared
                # the source freed blocks that fell out of its sliding window: take what the prefix cache still has
                seq.fork_source = None
                return self.kv.find_cached_prefix(seq)
            if source.status is SequenceStatus.WAITING:
                return None
            seq.fork_source = None  # the source finished: fall back to the prefix cache
        if seq.sampling_params.prompt_logprobs is not None and not seq.prompt_logprobs_done:
            return []  # every prompt position must be computed to get its logprobs
        return self.kv.find_cached_prefix(seq)

    def _commit(self, seq: Sequence, num_new: int, drafts: list[int] | None = None) -> ScheduledSeq:
        start = seq.num_computed_tokens
        samples = start + num_new == seq.num_tokens + (len(drafts) if drafts else 0)
        scheduled = ScheduledSeq(seq, start, num_new, samples, seq.num_tokens - seq.num_prompt_tokens,
                                 drafts or [])
        seq.num_computed_tokens += num_new
        if samples and (self.async_scheduling or (self.placeholders_for_draftless and not drafts)):
            seq.num_placeholders += 1
        return scheduled

    def preempt_all(self) -> list[Sequence]:
        """After a failed step: every running sequence back to waiting, in order, its blocks freed and its row dropped
        from the runner's batch (recomputed later, as after a preemption: nothing it emitted is lost)."""
        victims, self.running = self.running, []
        for seq in reversed(victims):
            self._preempt(seq)
            self._freed_keys.append(seq.key)
        return victims

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.spec_token_ids = []
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self._preemptions += 1
        self.total_preemptions += 1
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------------------------------------ stats
    def stats(self) -> SchedulerStats:
        out = SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            num_preemptions=self._preemptions,
            prefix_cache_queries=self._prefix_queries,
            prefix_cache_hits=self._prefix_hits,
            num_batched_tokens=self._batched_tokens,
        )
        self._batched_tokens = 0
        self._preemptions = self._prefix_queries = self._prefix_hits = 0
        return out
