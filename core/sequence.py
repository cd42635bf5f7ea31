"""One sequence's state inside the core. A request with ``n`` > 1 becomes n of these (one per index),
keyed by ``(request_id, index)``."""

from __future__ import annotations

import enum
import time

from ipc.messages import FinishReason, SamplingParams

_MASK32 = 0xFFFFFFFF


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """A sequence: its tokens, how many of them have KV in the cache, and what stops it."""

    __slots__ = (
        "request_id", "index", "key", "prompt_token_ids", "all_token_ids", "num_prompt_tokens", "sampling_params",
        "eos_token_ids", "stop_token_ids", "max_total_tokens", "cache_salt",
        "num_computed_tokens", "status", "finish_reason", "stop_reason", "block_hashes", "fork_source",
        "num_cached_tokens", "prefix_query_counted", "seed_key", "prompt_logprobs_done",
        "first_output_sent", "num_placeholders", "arrival_time", "queue_time_s", "spec_token_ids",
        "runner_state", "in_flight",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        index: int = 0,
        eos_token_ids: frozenset[int] = frozenset(),
        max_model_len: int,
        cache_salt: str | None = None,
        fork_source: "Sequence | None" = None,
    ) -> None:
        self.request_id = request_id
        self.index = index
        self.key = (request_id, index)
        self.prompt_token_ids = prompt_token_ids
        self.all_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids or ())
        max_tokens = sampling_params.max_tokens
        self.max_total_tokens = max_model_len if max_tokens is None else min(
            max_model_len, self.num_prompt_tokens + max_tokens
        )
        self.cache_salt = cache_salt
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | None = None
        self.block_hashes: list[bytes] = []
        self.fork_source = fork_source
        self.num_cached_tokens = 0
        self.prefix_query_counted = False
        self.prompt_logprobs_done = sampling_params.prompt_logprobs is None or index != 0
        self.first_output_sent = False
        self.arrival_time = time.monotonic()
        self.queue_time_s = 0.0  # arrival to first scheduling (vllm:request_queue_time_seconds)
        # Tokens being sampled by a step still in flight (async scheduling): counted in num_tokens, ids not known yet.
        self.num_placeholders = 0
        # Speculative decoding: draft tokens proposed for the next step (verified, never part of all_token_ids).
        self.spec_token_ids: list[int] = []
        # What the runners were sent about this sequence (core/scheduler_output_builder.py keeps it; None: nothing).
        self.runner_state: list | None = None
        # Pipeline parallelism: a micro-batch with this sequence is in flight (the scheduler skips it until its
        # results are in, so its next step's inputs are known).
        self.in_flight = False
        self.seed_key = seed_key(sampling_params.seed)

    @property
    def num_tokens(self) -> int:
        """Known tokens plus the ones a step in flight is sampling: what the scheduler computes up to."""
        return len(self.all_token_ids) + self.num_placeholders

    @property
    def num_output_tokens(self) -> int:
        """Output tokens known on the host (a step in flight may be sampling one more)."""
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> bool:
        """Add a sampled token (resolving a placeholder); returns True when it ends the sequence (and records why)."""
        self.all_token_ids.append(token_id)
        if self.num_placeholders:
            self.num_placeholders -= 1
        params = self.sampling_params
        if self.num_output_tokens > params.min_tokens:
            if token_id in self.eos_token_ids and not params.ignore_eos:
                return self._finish(FinishReason.STOP, None)
            if token_id in self.stop_token_ids:
                return self._finish(FinishReason.STOP, token_id)
        if len(self.all_token_ids) >= self.max_total_tokens:
            return self._finish(FinishReason.LENGTH, None)
        return False

    def _finish(self, reason: FinishReason, stop_reason: int | None) -> bool:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        return True

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}#{self.index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.name})")


def seed_key(seed: int | None) -> int | None:
    """A seeded sequence's 32-bit noise key (None: unseeded); the runners derive the same one from the params."""
    return None if seed is None else _mix32((seed & _MASK32) ^ _mix32((seed >> 32) & _MASK32))


def _mix32(x: int) -> int:
    """murmur3's finalizer: spreads a 32-bit key so that nearby seeds give unrelated streams."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    x ^= x >> 16
    return x
