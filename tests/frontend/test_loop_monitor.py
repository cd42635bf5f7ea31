"""The API process's stall metrics: event-loop lag and GC pauses (frontend/loop_monitor.py)."""

from __future__ import annotations

import asyncio
import gc
import time

from frontend.loop_monitor import LoopMonitor
from frontend.metrics import Metrics

_LABELS = {"model_name": "m", "engine": "0"}


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {**_LABELS, **labels}) or 0.0


def test_a_blocked_loop_and_a_gc_pause_show_in_the_histograms():
    metrics = Metrics("m", 1024)

    async def run() -> LoopMonitor:
        monitor = LoopMonitor(metrics, interval_s=0.01)
        monitor.start()
        await asyncio.sleep(0.05)  # a few quiet ticks
        time.sleep(0.2)  # something synchronous holds the loop: every stream would wait this long
        gc.collect()
        await asyncio.sleep(0.05)  # the monitor wakes late, records the lag and moves the GC pause over
        await monitor.stop()
        return monitor

    monitor = asyncio.run(run())
    ticks = _sample(metrics, "pagedserve:event_loop_lag_seconds_count")
    under_100ms = _sample(metrics, "pagedserve:event_loop_lag_seconds_bucket", le="0.1")
    assert ticks >= 3
    assert ticks - under_100ms >= 1  # the 200 ms stall, and only stalls that long, land above 100 ms
    assert monitor.max_lag_s >= 0.15
    assert _sample(metrics, "pagedserve:api_gc_pause_seconds_count", generation="2") >= 1
    # Stopped: the GC callback is gone.
    before = _sample(metrics, "pagedserve:api_gc_pause_seconds_count", generation="2")
    gc.collect()
    assert monitor._gc._callback not in gc.callbacks
    assert _sample(metrics, "pagedserve:api_gc_pause_seconds_count", generation="2") == before
