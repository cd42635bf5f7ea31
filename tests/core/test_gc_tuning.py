"""The startup-heap freeze and the GC pause recorder (core/gc_tuning.py)."""

from __future__ import annotations

import gc

import pytest

from core.gc_tuning import GEN0_THRESHOLD, GcPauseRecorder, freeze_startup_heap


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_freeze_moves_the_startup_heap_out_of_reach_and_raises_gen0(restore_gc):
    gc.unfreeze()
    survivors = [[i] for i in range(5000)]  # tracked objects that outlive startup
    frozen = freeze_startup_heap()
    # frozen objects may still be freed (a thread dropping its last reference), never added: the count only falls
    assert frozen >= len(survivors) and len(survivors) <= gc.get_freeze_count() <= frozen
    assert gc.get_threshold()[0] == GEN0_THRESHOLD
    # A full collection now scans only what was made after the freeze.
    assert gc.collect() == 0
    del survivors


def test_recorder_times_each_collection_and_reports_it(restore_gc):
    seen = []
    recorder = GcPauseRecorder(on_pause=lambda generation, seconds: seen.append((generation, seconds))).install()
    try:
        gc.collect(0)
        gc.collect()
    finally:
        recorder.uninstall()
    gc.collect()  # after uninstall: not recorded
    assert [g for g, _ in seen] == [0, 2]
    assert recorder.count[0] == 1 and recorder.count[2] == 1
    assert all(s > 0 for _, s in seen) and recorder.max_s[2] == seen[1][1]
    assert "gen2: 1 pauses" in recorder.summary()


def test_gen0_threshold_comes_from_the_environment(restore_gc, monkeypatch):
    gc.set_threshold(700, 10, 10)
    monkeypatch.setenv("PAGEDSERVE_GC_GEN0_THRESHOLD", "0")  # keep CPython's
    freeze_startup_heap()
    assert gc.get_threshold() == (700, 10, 10)
    monkeypatch.setenv("PAGEDSERVE_GC_GEN0_THRESHOLD", "50000")
    freeze_startup_heap()
    assert gc.get_threshold() == (50_000, 10, 10)
    monkeypatch.setenv("PAGEDSERVE_GC_GEN0_THRESHOLD", "lots")
    with pytest.raises(ValueError, match="PAGEDSERVE_GC_GEN0_THRESHOLD"):
        freeze_startup_heap()
