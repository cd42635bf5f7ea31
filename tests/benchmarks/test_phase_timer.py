"""The profiling benchmarks' phase timer: exclusive time per phase, nested phases counted once."""

import time

from benchmarks.phase_timer import PhaseTimer


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_nested_phase_is_subtracted_from_its_caller_in_wall_and_cpu_time():
    timer = PhaseTimer(cpu=True)
    inner = timer.wrap("inner", lambda: _busy(0.02))

    def outer_body():
        _busy(0.01)
        inner()

    t0, c0 = time.perf_counter(), time.thread_time()
    timer.wrap("outer", outer_body)()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    assert timer.totals["inner"] >= 0.02 and timer.totals["outer"] >= 0.01  # the busy loops' own wall time
    assert timer.totals["inner"] + timer.totals["outer"] <= wall  # the inner time counted once
    assert timer.totals["outer"] < wall - 0.02  # ... and not inside the outer phase's
    assert timer.cpu_totals["inner"] > 0 and timer.cpu_totals["outer"] > 0
    assert timer.cpu_totals["inner"] + timer.cpu_totals["outer"] <= cpu + 1e-6
    assert timer.phase == "other"


def test_without_cpu_only_wall_time_is_kept():
    timer = PhaseTimer()
    timer.wrap("step", lambda: _busy(0.002))()
    assert timer.totals["step"] > 0 and not timer.cpu_totals


class _Engine:
    def step(self) -> str:
        return "stepped"


def test_patch_times_methods_and_unpatch_puts_them_back():
    engine, timer = _Engine(), PhaseTimer()
    original = _Engine.__dict__["step"]
    timer.patch(engine, "step", "instance")  # an instance attribute shadowing the class's method
    timer.patch(_Engine, "step", "class")
    assert engine.step() == "stepped" and _Engine().step() == "stepped"
    assert set(timer.totals) == {"instance", "class"}
    timer.unpatch()
    assert "step" not in vars(engine) and _Engine.__dict__["step"] is original
