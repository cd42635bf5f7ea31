"""Acceptance counters under vLLM's names (``vllm:spec_decode_*``), as per-step deltas for ``SchedulerStats`` and
totals for ``get_stats``, and vLLM's periodic log line (acceptance rate, mean acceptance length)."""

from __future__ import annotations

import logging
import time

from ipc.messages import SchedulerStats

logger = logging.getLogger(__name__)


class SpecDecodeMetrics:
    def __init__(self, num_speculative_tokens: int, log_interval_s: float = 5.0) -> None:
        self.k = num_speculative_tokens
        self.log_interval_s = log_interval_s
        self._delta = self._zeros()
        self._since_log = self._zeros()
        self.total = self._zeros()
        self._last_log = time.monotonic()

    def _zeros(self) -> dict:
        # "by_accepted"[a]: verifications that accepted exactly a drafts (one increment per observation; the
        # per-position counts are its tail sums, taken only when read)
        return {"drafts": 0, "draft_tokens": 0, "accepted": 0, "by_accepted": [0] * (self.k + 1)}

    @staticmethod
    def _per_pos(counters: dict) -> list[int]:
        """Accepted drafts per position: position j counts the verifications that accepted more than j drafts."""
        per_pos, running = [], 0
        for count in reversed(counters["by_accepted"][1:]):
            running += count
            per_pos.append(running)
        return per_pos[::-1]

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        """One sequence's verification: ``num_drafts`` drafts offered, the first ``num_accepted`` accepted."""
        if num_drafts == 0:
            return
        for counters in (self._delta, self._since_log, self.total):
            counters["drafts"] += 1
            counters["draft_tokens"] += num_drafts
            counters["accepted"] += num_accepted
            counters["by_accepted"][num_accepted] += 1

    def fill(self, stats: SchedulerStats) -> None:
        """Move the deltas since the previous stats message into ``stats``; log every ``log_interval_s``."""
        d = self._delta
        stats.spec_num_drafts = d["drafts"]
        stats.spec_num_draft_tokens = d["draft_tokens"]
        stats.spec_num_accepted_tokens = d["accepted"]
        stats.spec_num_accepted_tokens_per_pos = self._per_pos(d)
        self._delta = self._zeros()
        now = time.monotonic()
        if now - self._last_log >= self.log_interval_s and self._since_log["drafts"]:
            self._last_log = now
            logger.info(self.summary(self._since_log))
            self._since_log = self._zeros()

    def summary(self, counters: dict | None = None) -> str:
        """vLLM's SpecDecoding metrics line."""
        c = self.total if counters is None else counters
        drafts, draft_tokens, accepted = c["drafts"], c["draft_tokens"], c["accepted"]
        rate = accepted / draft_tokens if draft_tokens else 0.0
        mean_length = 1 + accepted / drafts if drafts else 0.0
        per_pos = ", ".join(f"{n / drafts:.3f}" if drafts else "0.000" for n in self._per_pos(c))
        return (f"SpecDecoding metrics: Mean acceptance length: {mean_length:.2f}, Accepted: {accepted} tokens, "
                f"Drafted: {draft_tokens} tokens, Per-position acceptance rate: {per_pos}, "
                f"Avg Draft acceptance rate: {rate * 100:.1f}%")

    def totals(self) -> dict:
        c = self.total
        return {"spec_num_drafts": c["drafts"], "spec_num_draft_tokens": c["draft_tokens"],
                "spec_num_accepted_tokens": c["accepted"], "spec_num_accepted_tokens_per_pos": self._per_pos(c)}
