"""Exclusive time per phase of an engine step, for the profiling benchmarks that wrap the engine's methods."""

from __future__ import annotations

import collections
import functools
import time

_MISSING = object()


class PhaseTimer:
    """Exclusive host time per phase: a phase's nested phases are subtracted from it, so the phases add up to the
    step. ``cpu``: the calling thread's CPU time per phase too (``cpu_totals``; off by default, since reading it
    costs each wrapped call a little more)."""

    def __init__(self, cpu: bool = False) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.cpu_totals: dict[str, float] = collections.defaultdict(float)
        self._cpu = cpu
        self._stack: list[list] = []  # [phase, start, cpu start, nested seconds, nested cpu seconds]
        self._patched: list[tuple[object, str, object]] = []  # (owner, name, its own attribute or _MISSING)

    def wrap(self, phase: str, fn):
        cpu = self._cpu

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self._stack.append([phase, time.perf_counter(), time.thread_time() if cpu else 0.0, 0.0, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                name, start, cpu_start, nested, nested_cpu = self._stack.pop()
                elapsed = time.perf_counter() - start
                used = time.thread_time() - cpu_start if cpu else 0.0
                self.totals[name] += elapsed - nested
                if cpu:
                    self.cpu_totals[name] += used - nested_cpu
                if self._stack:
                    self._stack[-1][3] += elapsed
                    self._stack[-1][4] += used

        return wrapper

    def patch(self, owner: object, name: str, phase: str) -> None:
        """Replace ``owner.name`` (an instance's, a class's or a module's attribute) with its timed wrapper;
        ``unpatch`` puts every patched attribute back."""
        self._patched.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, self.wrap(phase, getattr(owner, name)))

    def unpatch(self) -> None:
        for owner, name, own in reversed(self._patched):
            if own is _MISSING:
                delattr(owner, name)  # an instance attribute shadowing its class's method
            else:
                setattr(owner, name, own)
        self._patched.clear()

    def reset(self) -> None:
        self.totals.clear()
        self.cpu_totals.clear()

    @property
    def phase(self) -> str:
        return self._stack[-1][0] if self._stack else "other"
