"""Keep Python's cyclic garbage collector out of the token stream, in the engine core and the API processes.

A collection stops the whole process: in the core it delays the step (every stream's next token), in an API
process it delays every stream that process serves. Two things make the pauses long: the heap left by startup
(model modules, tokenizer, FastAPI routes: hundreds of thousands of tracked objects that every full collection
rescans) and frequent young-generation collections under per-token object churn. So, once warm, as vLLM does:
collect and ``gc.freeze()`` what startup left (it is never garbage), and raise the young-generation threshold so
collections come less often (each is still short: only objects made since the last one are scanned).

``GcPauseRecorder`` measures the pauses (``gc.callbacks``): the API processes export them as a histogram
(``pagedserve:gc_pause_seconds``) and ``benchmarks/gc_pauses.py`` records the core's on a W5-like run.
Import-light (no torch): both processes import it.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from typing import Any

from core import envs

# Young-generation threshold once warm (CPython's default is 700): allocations minus deallocations of tracked
# objects between gen-0 collections. Most per-token objects die by reference counting, so a high threshold is
# rarely crossed: a loop keeping a few thousand small dicts alive ran 533 collections (max 8 ms) at 700 and
# none at 20,000 (benchmarks/RESULTS.md, GC pauses). Each collection still scans only the young objects.
GEN0_THRESHOLD = 20_000


def freeze_startup_heap(gen0_threshold: int | None = None) -> int:
    """Collect once, move every surviving object to the permanent generation (never scanned again), and raise
    the gen-0 threshold (default: ``PAGEDSERVE_GC_GEN0_THRESHOLD``, else ``GEN0_THRESHOLD``; 0 leaves it).
    Call once startup is done, before serving. Returns how many objects were frozen."""
    if gen0_threshold is None:
        gen0_threshold = envs.gc_gen0_threshold(GEN0_THRESHOLD)
    gc.collect()
    gc.freeze()
    if gen0_threshold:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, gen1, gen2)
    return gc.get_freeze_count()


class GcPauseRecorder:
    """Times every collection of this process through ``gc.callbacks``; ``on_pause(generation, seconds)`` sees
    each one (e.g. a Prometheus histogram). Keeps totals per generation and the longest pause."""

    def __init__(self, on_pause: Callable[[int, float], None] | None = None) -> None:
        self.on_pause = on_pause
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self._started: dict[int, float] = {}  # thread id -> start (a collection runs in whichever thread allocated)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started[threading.get_ident()] = time.perf_counter()
            return
        started = self._started.pop(threading.get_ident(), None)
        if started is None:  # installed mid-collection
            return
        seconds = time.perf_counter() - started
        generation = info["generation"]
        self.count[generation] += 1
        self.total_s[generation] += seconds
        self.max_s[generation] = max(self.max_s[generation], seconds)
        if self.on_pause is not None:
            self.on_pause(generation, seconds)

    def install(self) -> GcPauseRecorder:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def summary(self) -> str:
        return ", ".join(f"gen{g}: {self.count[g]} pauses, {self.total_s[g] * 1000:.1f} ms total, "
                         f"max {self.max_s[g] * 1000:.2f} ms" for g in range(3))
