"""The W5 summary line (benchmarks/w5_summary.py): client numbers, where the ITL tail sits, server stall metrics."""

from __future__ import annotations

import json

from benchmarks import w5_summary

_FLAT = {"request_throughput": 176.24, "median_ttft_ms": 333.0, "p99_ttft_ms": 837.0, "median_itl_ms": 5.33,
         "p99_itl_ms": 46.4, "median_tpot_ms": 8.6, "p99_tpot_ms": 10.7, "max_output_tokens_per_s": 28342.0,
         "failed": 0}


def _result(slow_in_ramp: bool) -> dict:
    """Four requests, three sent at once (the last one's first token at 1.0 s ends the ramp), the fourth at 2 s.
    One 200 ms gap: early in request 0 (ends at 0.4 s) or in request 3."""
    starts = [0.0, 0.0, 0.0, 2.0]
    ttfts = [0.2, 0.5, 1.0, 0.1]
    itls = [[0.01] * 30, [0.01] * 30, [0.01] * 30, [0.01] * 30]
    if slow_in_ramp:
        itls[0][0] = 0.2
    else:
        itls[3][5] = 0.2
    return {**_FLAT, "max_concurrency": 3, "start_times": starts, "ttfts": ttfts, "itls": itls}


def test_summary_line_has_every_goal_metric():
    line = w5_summary.summary_line("w5-c256-base", dict(_FLAT))
    assert line == ("w5-c256-base: 176.2 req/s | TTFT p50/p99 333.0/837.0 ms | ITL p50/p99 5.3/46.4 ms | "
                    "TPOT p50/p99 8.6/10.7 ms | peak 28342 out tok/s")


def test_tail_location_tells_ramp_from_steady_state():
    ramp = w5_summary.tail_location(_result(slow_in_ramp=True))
    steady = w5_summary.tail_location(_result(slow_in_ramp=False))
    assert "1 in the ramp (first 1.00 s" in ramp and "0 after it" in ramp
    assert "steady-state ITL p99 10.0 ms" in ramp
    assert "0 in the ramp" in steady and "1 after it" in steady
    assert float(steady.split("steady-state ITL p99 ")[1].split(" ")[0]) > 10.0


def test_stall_metrics_sum_the_api_processes_and_count_big_steps(tmp_path):
    def buckets(name: str, server: str, counts: list[float], edges: list[str]) -> str:
        return "\n".join(f'{name}_bucket{{api="{server}",le="{le}"}} {c}' for le, c in zip(edges, counts))

    lag_edges = ["0.001", "0.01", "0.04", "+Inf"]
    text = "\n".join([
        buckets("pagedserve:event_loop_lag_seconds", "0", [90, 95, 99, 100], lag_edges),
        buckets("pagedserve:event_loop_lag_seconds", "1", [50, 98, 100, 100], lag_edges),
        buckets("pagedserve:api_gc_pause_seconds", "0", [3, 4, 5, 5], lag_edges),
        buckets("vllm:iteration_tokens_total", "0", [10, 40, 45, 50], ["256", "1024", "4096", "+Inf"]),
    ])
    line = w5_summary.stall_metrics(text)
    assert "API loop lag > 10 ms in 7/200 ticks, > 40 ms in 1" in line
    assert "API GC pauses 5 (1 > 10 ms)" in line
    assert "engine steps > 4096 tokens: 5/50" in line
    log = "x\n2026 INFO [engine] GC pauses while serving: gen0: 3 pauses, 1.0 ms total, max 0.50 ms\n"
    assert w5_summary.core_gc(log) == " | core GC: gen0: 3 pauses, 1.0 ms total, max 0.50 ms"

    result = tmp_path / "run.json"
    result.write_text(json.dumps(dict(_FLAT)))
    (tmp_path / "run.metrics.txt").write_text(text)
    (tmp_path / "run.server.log").write_text(log)
    w5_summary.main([str(result), "--metrics", str(tmp_path / "run.metrics.txt"),
                     "--server-log", str(tmp_path / "run.server.log")])
