"""Continuous batching with one token budget per step.

No prefill or decode phases: every running request gets the tokens it needs to catch up (1 for a decode, a chunk
for a prefill), running requests first, then waiting ones in arrival order, up to ``max_num_seqs``. When blocks run
out, the newest running request is preempted: its blocks are freed and it is recomputed later (prefix caching
recovers its full blocks). ``num_computed_tokens`` advances when tokens are scheduled, so a request scheduled later
in the same step can share blocks being filled now (each layer writes all new KV before any attention reads it).
Pure Python.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from core.kv_cache import KVBlock, KVCacheManager
from core.request import Request, RequestStatus
from ipc.messages import FinishReason, SchedulerStats


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    start: int  # first position computed this step (num_computed_tokens before it)
    num_tokens: int
    samples: bool  # the step reaches the end of the sequence's tokens, so its last logits are sampled
    output_index: int  # index in the output of the token sampled (when ``samples``)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # batch row order
    total_num_tokens: int
    preempted: list[Request] = field(default_factory=list)
    freed_keys: list[tuple[str, int]] = field(default_factory=list)  # finished/aborted/preempted since last step

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
        async_scheduling: bool = False,
    ) -> None:
        """``async_scheduling``: a step is scheduled while the previous one is still running, so a sequence that
        samples gets a placeholder token, resolved when the step's results arrive."""
        self.kv = kv
        self.async_scheduling = async_scheduling
        self.block_size = kv.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[tuple[str, int], Request] = {}
        self._freed_keys: list[tuple[str, int]] = []
        # stats deltas since the last stats() call
        self._preemptions = 0
        self._prefix_queries = 0
        self._prefix_hits = 0
        self.total_preemptions = 0
        self.total_prefix_queries = 0
        self.total_prefix_hits = 0
        self.holds: Callable[[Request], bool] | None = None  # a waiting request it holds is skipped this step

    # ------------------------------------------------------------------------------------------------ intake
    def add_request(self, request: Request) -> None:
        self.requests[request.key] = request
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Remove a request (finished or aborted) and free its blocks."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        if request.finish_reason is None:
            request.finish_reason = reason
        request.status = RequestStatus.FINISHED
        self.kv.free(request)
        self.requests.pop(request.key, None)
        self._freed_keys.append(request.key)

    # ------------------------------------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_tokens >= request.max_total_tokens:
                i += 1  # its last token is being sampled: nothing more to compute
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, preempted):
                break  # the request preempted itself: nothing newer is left to schedule
            scheduled.append(self._commit(request, num_new))
            budget -= num_new
            i += 1

        if not preempted:
            budget = self._schedule_waiting(scheduled, budget)

        freed, self._freed_keys = self._freed_keys, []
        freed.extend(r.key for r in preempted)
        return SchedulerOutput(scheduled, self.max_num_batched_tokens - budget, preempted, freed)

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[Request]) -> bool:
        """Room for a running request's tokens, preempting the newest running requests until it fits; False when
        the request itself had to go."""
        while not self.kv.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, scheduled: list[ScheduledSeq], budget: int) -> int:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if self.holds is not None and self.holds(request):  # e.g. its grammar is still compiling
                skipped.append(self.waiting.popleft())
                continue
            shared = self._shared_prefix(request) if not request.num_placeholders else None
            if shared is None:  # a fork whose source has not scheduled its prompt yet, or a token still in flight
                skipped.append(self.waiting.popleft())
                continue
            num_shared_tokens = len(shared) * self.block_size
            num_new = min(request.num_tokens - request.num_computed_tokens - num_shared_tokens, budget)
            if not self.kv.allocate_slots(request, num_new, shared):
                break
            self.waiting.popleft()
            if not request.prefix_query_counted and request.fork_source is None:
                # Counted once per request, in tokens: a recompute after preemption is never a "hit".
                request.prefix_query_counted = True
                request.num_cached_tokens = num_shared_tokens
                self._prefix_queries += request.num_tokens
                self._prefix_hits += num_shared_tokens
                self.total_prefix_queries += request.num_tokens
                self.total_prefix_hits += num_shared_tokens
            request.num_computed_tokens += num_shared_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._commit(request, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _shared_prefix(self, request: Request) -> list[KVBlock] | None:
        """Blocks a waiting request can reuse: its fork source's prompt blocks, else prefix-cache hits.
        None means "not yet": the fork source has not scheduled its prompt's full blocks."""
        if request.num_computed_tokens > 0:
            return []
        source = request.fork_source
        if source is not None:
            num_blocks = (request.num_tokens - 1) // self.block_size
            if source.status is RequestStatus.RUNNING:
                if source.num_computed_tokens < num_blocks * self.block_size:
                    return None
                return self.kv.blocks(source)[:num_blocks]
            if source.status is RequestStatus.WAITING:
                return None
            request.fork_source = None  # the source finished: fall back to the prefix cache
        if request.sampling_params.prompt_logprobs is not None and not request.prompt_logprobs_done:
            return []  # every prompt position must be computed to get its logprobs
        return self.kv.find_cached_prefix(request)

    def _commit(self, request: Request, num_new: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        samples = start + num_new == request.num_tokens
        seq = ScheduledSeq(request, start, num_new, samples, request.num_tokens - request.num_prompt_tokens)
        request.num_computed_tokens += num_new
        if samples and self.async_scheduling:
            request.num_placeholders += 1
        return seq

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._preemptions += 1
        self.total_preemptions += 1
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------------------------------------ stats
    def stats(self) -> SchedulerStats:
        out = SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            num_preemptions=self._preemptions,
            prefix_cache_queries=self._prefix_queries,
            prefix_cache_hits=self._prefix_hits,
        )
        self._preemptions = self._prefix_queries = self._prefix_hits = 0
        return out
