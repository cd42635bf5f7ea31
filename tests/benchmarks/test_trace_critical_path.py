"""benchmarks/trace_critical_path.py: each GPU event charged with how far it moved the end of the work, so kernels
that start early and wait inside (PDL) are not counted twice."""

from __future__ import annotations

import gzip
import json

from benchmarks.trace_critical_path import critical_path, gpu_events, main


def _event(name: str, start: float, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": start, "dur": dur}


def test_overlapping_kernels_are_charged_by_their_ends():
    # b starts while a runs (a PDL launch) and ends 3 us after it; c lies wholly inside b; the copy ends last
    trace = {"traceEvents": [_event("a", 0, 10), _event("b", 2, 11), _event("c", 4, 5),
                             _event("copy", 13, 2, cat="gpu_memcpy"), {"ph": "X", "cat": "cpu_op", "name": "host",
                                                                       "ts": 0, "dur": 100}]}  # fmt: skip
    events = gpu_events(trace)
    assert [e["name"] for e in events] == ["c", "a", "b", "copy"]  # by end time; host ops left out
    deltas = critical_path(events)
    assert deltas == {"a": [1.0], "b": [3.0], "copy": [2.0]}
    assert sum(sum(v) for v in deltas.values()) == 15 - 9  # the span from the first end to the last


def test_main_prints_per_step_totals(tmp_path, capsys):
    trace = {"traceEvents": [_event("norm", 0, 2), _event("gemm", 1, 10), _event("norm", 12, 2),
                             _event("gemm", 13, 10)]}  # fmt: skip
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    assert main([str(path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    # ends at 2, 11, 14, 23: gemm moved the end 9 + 9 us, the second norm 3 (the first only starts the chain)
    assert out.splitlines()[0] == "0.011 ms per step on the chain (2 steps)"
    assert "   0.009        1.0      9.00  gemm" in out.splitlines()
