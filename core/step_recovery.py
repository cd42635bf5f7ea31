"""What the engine core does when one step raises: fail the request that caused it, never the whole engine.

A step runs many requests at once, so an exception rarely names its culprit. The rule (issue 17: "the core rejects a
bad request by failing that request alone, never itself"):

- the failed step involved one request (not yet cleared, see below): that request fails alone (the frontend answers
  500), its blocks are freed, every other request keeps going;
- it involved several: every running sequence goes back to waiting (as after a preemption: nothing emitted is lost,
  the KV is recomputed) and the involved requests become *suspects*, run one at a time ("isolation") until each has
  had a step's sampled token processed without error (it is *cleared*, and may run beside the next suspects) or has
  failed alone (it is the culprit). Limit: a cleared request that fails later in the same episode, beside a
  suspect, gets the suspect blamed; outside an episode nothing is cleared;
- the failure is not attributable (nothing involved, or only cleared requests), repeats (an out-of-memory error twice
  in a row, ``MAX_CONSECUTIVE_FAILURES`` failed steps without one that succeeded) or is a device error after which
  the device cannot be trusted (CUDA errors, device-side asserts): the core dies as before (``EngineDead``).

``FaultInjector`` is the test-only hook that raises inside a step (``PAGEDSERVE_TEST_STEP_FAULT_TOKENS``).
"""

from __future__ import annotations

from collections.abc import Iterable

from core import envs

# Failed steps in a row (no step succeeded between them) after which the engine stops trusting itself.
MAX_CONSECUTIVE_FAILURES = 4

# An exception whose text holds one of these comes from a device that may be in an undefined state: die.
_FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert",
                  "illegal memory access", "NCCL", "unspecified launch failure", "HIP error")


class StepFailedFatally(RuntimeError):
    """A step failure the core cannot attribute to one request or should not survive; ends the engine process."""


class InjectedStepFault(RuntimeError):
    """Raised by ``FaultInjector`` (tests only)."""


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)


def is_device_fatal(exc: BaseException) -> bool:
    """Errors after which the device (and every tensor on it) cannot be trusted: the process must restart."""
    if is_out_of_memory(exc):
        return False
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _FATAL_MARKERS) or type(exc).__name__ == "AcceleratorError"


class StepFailureTracker:
    """Suspects, cleared requests and the failure streak of the current isolation episode."""

    def __init__(self) -> None:
        self.suspects: list[str] = []  # request ids still to run alone, in order; suspects[0] is the probe
        self.cleared: set[str] = set()  # requests that sampled in a successful step since the episode began
        self.consecutive_failures = 0
        self.last_was_oom = False

    @property
    def isolating(self) -> bool:
        return bool(self.suspects)

    @property
    def probe(self) -> str | None:
        return self.suspects[0] if self.suspects else None

    def holds(self, request_id: str) -> bool:
        """During isolation only the probe and the requests already cleared may be scheduled."""
        return bool(self.suspects) and request_id != self.suspects[0] and request_id not in self.cleared

    def on_success(self, sampled_request_ids: Iterable[str], live_request_ids: set[str] | dict) -> None:
        """A step succeeded: the probe is cleared once it sampled; finished suspects leave the list."""
        self.consecutive_failures = 0
        self.last_was_oom = False
        if not self.suspects:
            return
        sampled = set(sampled_request_ids)
        while self.suspects and (self.suspects[0] in sampled or self.suspects[0] not in live_request_ids):
            self.cleared.add(self.suspects.pop(0))
        self.suspects = [r for r in self.suspects if r in live_request_ids]
        if not self.suspects:
            self.cleared.clear()  # the episode is over

    def attribute(self, exc: BaseException, involved: list[str]) -> str | None:
        """After a failed step: the culprit request id, or None to start isolating ``involved``; raises
        ``StepFailedFatally`` when the engine must die."""
        self.consecutive_failures += 1
        oom = is_out_of_memory(exc)
        reason = None
        if is_device_fatal(exc):
            reason = "a device error"
        elif oom and self.last_was_oom:
            reason = "out of memory twice in a row"
        elif self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            reason = f"{self.consecutive_failures} failed steps in a row"
        self.last_was_oom = oom
        candidates = [r for r in involved if r not in self.cleared]
        if reason is None and not candidates:
            reason = "a step without a request to blame"
        if reason is None and len(candidates) > 1 and self.isolating:
            reason = "several requests failed together while isolating"
        if reason is not None:
            raise StepFailedFatally(f"engine step failed ({reason}): {type(exc).__name__}: {exc}") from exc
        if len(candidates) == 1:
            culprit = candidates[0]
            if culprit in self.suspects:
                self.suspects.remove(culprit)
            if not self.suspects:
                self.cleared.clear()
            return culprit
        self.suspects = candidates
        return None


class FaultInjector:
    """Test-only: raises ``InjectedStepFault`` in a step that schedules a sequence whose prompt contains the token-id
    run in ``PAGEDSERVE_TEST_STEP_FAULT_TOKENS`` (read once, at engine start). Unset: never raises, costs nothing."""

    def __init__(self, marker: list[int] | None = None) -> None:
        self.marker = marker if marker is not None else envs.step_fault_tokens()

    @property
    def enabled(self) -> bool:
        return bool(self.marker)

    def check(self, prompts: Iterable[tuple[str, list[int]]]) -> None:
        """``prompts``: (request id, prompt token ids) of the step's sequences."""
        marker = self.marker
        n = len(marker)
        for request_id, prompt in prompts:
            first = marker[0]
            for i in range(len(prompt) - n + 1):
                if prompt[i] == first and prompt[i : i + n] == marker:
                    raise InjectedStepFault(f"injected step fault for request {request_id} "
                                            "(PAGEDSERVE_TEST_STEP_FAULT_TOKENS)")
