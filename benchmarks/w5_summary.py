"""One line per W5 result JSON (``bench serve --save-result``): the numbers issue 16 is judged on.

    python -m benchmarks.w5_summary OUT/c256.json OUT/c32.json
    python -m benchmarks.w5_summary RUN.json --metrics RUN.metrics.txt --server-log RUN.server.log

Prints req/s, TTFT p50/p99, ITL p50/p99, TPOT p50/p99 and peak output tok/s. When the JSON has per-request data
(``--save-detailed``) it also says where the gaps above ITL p99 fall: during the ramp (until the first
``max_concurrency`` requests all have their first token: their prompts are prefilled in big steps beside the first
decodes) or in the steady state after it, and the ITL p99 of the steady state alone. That tells a big-prefill-step
tail (ramp) from API-process stalls (spread over the run) without another GPU run. With ``--metrics`` (the server's
/metrics after the load) and ``--server-log``, it adds the API processes' event-loop lag and GC pauses, the engine
steps over 4096 tokens, and the core's GC pauses.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np


def gap_end_times(result: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(gap lengths s, the time each gap ended s, when the ramp ended s), from the run's start; None without
    per-request data. The ramp: until the first ``max_concurrency`` requests (sent at once) all have their first
    token, i.e. while their prompts are being prefilled beside the decodes of the ones already started."""
    starts, ttfts, itls = result.get("start_times"), result.get("ttfts"), result.get("itls")
    if not starts or ttfts is None or itls is None:
        return None
    origin = min(starts)
    first_wave = sorted(range(len(starts)), key=lambda i: starts[i])[:result.get("max_concurrency") or len(starts)]
    ramp_end = max((starts[i] - origin + ttfts[i] for i in first_wave if ttfts[i] is not None), default=0.0)
    gaps: list[float] = []
    ends: list[float] = []
    for start, ttft, request_itls in zip(starts, ttfts, itls):
        if ttft is None or not request_itls:
            continue
        gaps.extend(request_itls)
        ends.extend((start - origin + ttft + np.cumsum(request_itls)).tolist())
    if not gaps:
        return None
    return np.asarray(gaps), np.asarray(ends), ramp_end


def tail_location(result: dict[str, Any]) -> str:
    """Where the gaps above ITL p99 are (ramp vs steady state), and the steady state's own ITL p99."""
    timed = gap_end_times(result)
    if timed is None:
        return ""
    gaps, ends, ramp_end = timed
    threshold = np.percentile(gaps, 99)
    slow = gaps > threshold
    in_ramp = ends <= ramp_end
    steady = gaps[~in_ramp]
    steady_p99 = float(np.percentile(steady, 99)) * 1000 if steady.size else float("nan")
    return (f" | gaps above ITL p99 ({threshold * 1000:.1f} ms): {slow[in_ramp].sum()} in the ramp "
            f"(first {ramp_end:.2f} s, {in_ramp.mean():.0%} of gaps), {slow[~in_ramp].sum()} after it; "
            f"steady-state ITL p99 {steady_p99:.1f} ms")


def histogram_buckets(metrics_text: str, name: str) -> list[tuple[float, float]]:
    """A Prometheus histogram's cumulative buckets [(le, count)], summed over its label sets (API processes)."""
    totals: dict[float, float] = {}
    for match in re.finditer(rf'^{re.escape(name)}_bucket{{(?P<labels>[^}}]*)}} (?P<value>\S+)$', metrics_text, re.M):
        le = re.search(r'le="([^"]+)"', match["labels"])
        if le:
            bound = float("inf") if le[1] == "+Inf" else float(le[1])
            totals[bound] = totals.get(bound, 0.0) + float(match["value"])
    return sorted(totals.items())


def share_above(buckets: list[tuple[float, float]], bound: float) -> tuple[float, float]:
    """(count above ``bound``, total count) of a cumulative histogram; ``bound`` must be one of its bucket edges."""
    total = buckets[-1][1] if buckets else 0.0
    below = next((count for le, count in buckets if le == bound), total)
    return total - below, total


def stall_metrics(metrics_text: str) -> str:
    """The server side of the tail, from its /metrics after the load: API event-loop lag, API GC pauses, and how
    many engine steps carried big prefill chunks (vllm:iteration_tokens_total)."""
    parts = []
    lag = histogram_buckets(metrics_text, "pagedserve:event_loop_lag_seconds")
    if lag:
        over_10, ticks = share_above(lag, 0.01)
        over_40, _ = share_above(lag, 0.04)
        parts.append(f"API loop lag > 10 ms in {over_10:.0f}/{ticks:.0f} ticks, > 40 ms in {over_40:.0f}")
    pauses = histogram_buckets(metrics_text, "pagedserve:api_gc_pause_seconds")
    if pauses:
        over_10, count = share_above(pauses, 0.01)
        parts.append(f"API GC pauses {count:.0f} ({over_10:.0f} > 10 ms)")
    steps = histogram_buckets(metrics_text, "vllm:iteration_tokens_total")
    if steps:
        big, total = share_above(steps, 4096)
        parts.append(f"engine steps > 4096 tokens: {big:.0f}/{total:.0f}")
    return (" | " + "; ".join(parts)) if parts else ""


def core_gc(server_log: str) -> str:
    """The engine core's own GC pauses while serving (it logs them when it stops)."""
    match = re.findall(r"GC pauses while serving: (.*)", server_log)
    return f" | core GC: {match[-1]}" if match else ""


def summary_line(name: str, result: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        value = result.get(key)
        return "n/a" if value is None else f"{value:.1f}"

    failed = result.get("failed", 0)
    return (f"{name}: {result['request_throughput']:.1f} req/s | TTFT p50/p99 {ms('median_ttft_ms')}/"
            f"{ms('p99_ttft_ms')} ms | ITL p50/p99 {ms('median_itl_ms')}/{ms('p99_itl_ms')} ms | TPOT p50/p99 "
            f"{ms('median_tpot_ms')}/{ms('p99_tpot_ms')} ms | peak {result['max_output_tokens_per_s']:.0f} out tok/s"
            + (f" | {failed} FAILED" if failed else "") + tail_location(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="result JSON files of `bench serve --save-result`")
    parser.add_argument("--metrics", type=Path, default=None, help="the server's /metrics text after the load "
                        "(one result file only)")
    parser.add_argument("--server-log", type=Path, default=None, help="the server's log (one result file only)")
    args = parser.parse_args(argv)
    if (args.metrics or args.server_log) and len(args.results) != 1:
        parser.error("--metrics and --server-log describe one run: give one result file")
    for path in args.results:
        line = summary_line(path.stem, json.loads(path.read_text()))
        if args.metrics is not None and args.metrics.is_file():
            line += stall_metrics(args.metrics.read_text())
        if args.server_log is not None and args.server_log.is_file():
            line += core_gc(args.server_log.read_text(errors="replace"))
        print(line)


if __name__ == "__main__":
    main()
