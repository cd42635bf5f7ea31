"""How long the API process stops serving streams: event-loop lag and garbage-collector pauses, as metrics.

Every stream of an API process advances on its one event loop: any stall of that loop (a synchronous tokenize, a
burst of admissions, a GC pause) is an inter-token gap for every stream at once, which is what ITL p99 sees. This
task wakes every ``interval_s`` and records how late it woke (``pagedserve:event_loop_lag_seconds``), and moves the
GC pauses that ``GcPauseRecorder`` timed since into ``pagedserve:api_gc_pause_seconds``. The GC callback only
appends to a deque: it can fire inside a metric's own locked update, so it must not touch a metric itself.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from core.gc_tuning import GcPauseRecorder
from frontend.metrics import Metrics

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.05


class LoopMonitor:
    def __init__(self, metrics: Metrics, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.max_lag_s = 0.0
        self._pauses: collections.deque[tuple[int, float]] = collections.deque(maxlen=10_000)
        self._gc = GcPauseRecorder(on_pause=lambda generation, s: self._pauses.append((generation, s)))
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._gc.install()
        self._task = asyncio.create_task(self._run(), name="loop-monitor")

    async def stop(self) -> None:
        self._gc.uninstall()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - before - self.interval_s)
            self.max_lag_s = max(self.max_lag_s, lag)
            self.metrics.event_loop_lag.observe(lag)
            while self._pauses:
                generation, seconds = self._pauses.popleft()
                self.metrics.record_gc_pause(generation, seconds)
