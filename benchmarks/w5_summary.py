"""One line per W5 result JSON (``bench serve --save-result``): the numbers issue 16 is judged on.

    python -m benchmarks.w5_summary OUT/c256.json OUT/c32.json

Prints req/s, TTFT p50/p99, ITL p50/p99, TPOT p50/p99 and peak output tok/s. When the JSON has per-request data
(``--save-detailed``) it also says where the slowest 1% of inter-token gaps fall: during the ramp (before the first
request finished, when the first ``concurrency`` prompts are all being prefilled beside the first decodes) or in
the steady state after it, and the ITL p99 of the steady state alone. That tells a big-prefill-step tail (ramp)
from API-process stalls (spread over the run) without another GPU run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np


def gap_end_times(result: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(gap lengths s, the time each gap ended s, when the first request finished s), all from the run's start;
    None without per-request data."""
    starts, ttfts, itls = result.get("start_times"), result.get("ttfts"), result.get("itls")
    if not starts or ttfts is None or itls is None:
        return None
    gaps: list[float] = []
    ends: list[float] = []
    finishes: list[float] = []
    origin = min(starts)
    for start, ttft, request_itls in zip(starts, ttfts, itls):
        if ttft is None:
            continue
        first_token = start - origin + ttft
        times = first_token + np.cumsum(request_itls) if request_itls else np.empty(0)
        gaps.extend(request_itls)
        ends.extend(times.tolist())
        finishes.append(float(times[-1]) if len(times) else first_token)
    if not gaps:
        return None
    return np.asarray(gaps), np.asarray(ends), min(finishes)


def tail_location(result: dict[str, Any]) -> str:
    """Where the slowest 1% of gaps are (ramp vs steady state), and the steady state's own ITL p99."""
    timed = gap_end_times(result)
    if timed is None:
        return ""
    gaps, ends, ramp_end = timed
    threshold = np.percentile(gaps, 99)
    slow = gaps >= threshold
    in_ramp = ends <= ramp_end
    steady = gaps[~in_ramp]
    steady_p99 = float(np.percentile(steady, 99)) * 1000 if steady.size else float("nan")
    return (f" | slowest 1% of gaps (>= {threshold * 1000:.1f} ms): {slow[in_ramp].sum()} in the ramp "
            f"(first {ramp_end:.2f} s, {in_ramp.mean():.0%} of gaps), {slow[~in_ramp].sum()} after it; "
            f"steady-state ITL p99 {steady_p99:.1f} ms")


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
    args = parser.parse_args(argv)
    for path in args.results:
        print(summary_line(path.stem, json.loads(path.read_text())))


if __name__ == "__main__":
    main()
