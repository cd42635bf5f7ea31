"""Turn per-request measurements into the numbers ``vllm bench serve`` reports (same names, same definitions).

TTFT: request sent -> first token chunk. TPOT: (E2E - TTFT) / (output tokens - 1), per request. ITL: gap between
consecutive token chunks, pooled over requests. E2E: request sent -> last token chunk. Throughputs divide by the
wall time from the first request sent to the last one finished (or to the ``--duration`` deadline).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from benchmarks.openai_client import RequestOutput

LATENCY_METRICS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                   "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
_LABELS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    incomplete: int
    duration: float
    total_input_tokens: int
    total_output_tokens: int
    output_tokens_source: str
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    failure_reasons: dict[str, int]
    prompt_len_mismatches: int
    output_len_mismatches: int
    latencies_ms: dict[str, dict[str, float | None]]
    per_request: dict[str, list[Any]]

    def flat(self) -> dict[str, Any]:
        """JSON-ready, with vLLM's key names (mean_ttft_ms, p99_itl_ms, ...)."""
        data = {k: v for k, v in self.__dict__.items() if k not in ("latencies_ms", "per_request")}
        for metric, stats in self.latencies_ms.items():
            for stat, value in stats.items():
                data[f"{stat}_{metric}_ms"] = value
        return data


def count_output_tokens(outputs: list[RequestOutput], count_text: Callable[[str], int]) -> tuple[list[int], str]:
    """Output tokens per successful request: the server's usage when it sent one, else the tokenizer's count."""
    counts, sources = [], set()
    for out in outputs:
        if not out.success:
            counts.append(0)
        elif out.output_tokens is not None:
            counts.append(int(out.output_tokens))
            sources.add("usage")
        else:
            counts.append(count_text(out.generated_text))
            sources.add("tokenizer")
    source = "mixed" if len(sources) > 1 else (sources.pop() if sources else "none")
    return counts, source


def summarize(values_s: list[float], percentiles: list[float]) -> dict[str, float | None]:
    """mean/median/std and the asked percentiles, in ms; None when there is nothing to summarize."""
    keys = ["mean", "median", "std"] + [f"p{_pct_name(p)}" for p in percentiles]
    if not values_s:
        return dict.fromkeys(keys)
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    stats = {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
    for p in percentiles:
        stats[f"p{_pct_name(p)}"] = float(np.percentile(arr, p))
    return stats


def _pct_name(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def compute_metrics(
    outputs: list[RequestOutput],
    duration: float,
    count_text: Callable[[str], int],
    percentiles: list[float],
    ignore_eos: bool,
) -> BenchmarkMetrics:
    output_lens, source = count_output_tokens(outputs, count_text)
    ok = [i for i, out in enumerate(outputs) if out.success]
    failed = [out for out in outputs if out.started and not out.success and not out.cancelled]
    incomplete = sum(1 for out in outputs if out.cancelled or not out.started)

    ttfts, tpots, itls, e2els = [], [], [], []
    input_tokens = 0
    prompt_mismatch = output_mismatch = 0
    for i in ok:
        out, n_out = outputs[i], output_lens[i]
        ttfts.append(out.ttft)
        e2els.append(out.latency)
        itls.extend(out.itl)
        if n_out > 1:
            tpots.append((out.latency - out.ttft) / (n_out - 1))
        served_prompt = out.server_prompt_tokens if out.server_prompt_tokens is not None else out.prompt_len
        input_tokens += served_prompt
        prompt_mismatch += served_prompt != out.prompt_len
        output_mismatch += ignore_eos and n_out != out.expected_output_len
    total_output = sum(output_lens)
    duration = max(duration, 1e-9)
    rates, _ = token_rate_series([outputs[i] for i in ok], [output_lens[i] for i in ok], bucket_s=1.0)
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(failed),
        incomplete=incomplete,
        duration=duration,
        total_input_tokens=input_tokens,
        total_output_tokens=total_output,
        output_tokens_source=source,
        request_throughput=len(ok) / duration,
        output_throughput=total_output / duration,
        total_token_throughput=(input_tokens + total_output) / duration,
        max_output_tokens_per_s=float(rates.max()) if rates.size else 0.0,
        max_concurrent_requests=peak_concurrency([outputs[i] for i in ok]),
        failure_reasons=dict(Counter(_reason(out.error) for out in failed).most_common()),
        prompt_len_mismatches=prompt_mismatch,
        output_len_mismatches=output_mismatch,
        latencies_ms={
            "ttft": summarize(ttfts, percentiles),
            "tpot": summarize(tpots, percentiles),
            "itl": summarize(itls, percentiles),
            "e2el": summarize(e2els, percentiles),
        },
        per_request={
            "input_lens": [out.prompt_len for out in outputs],
            "output_lens": output_lens,
            "ttfts": [out.ttft if out.success else None for out in outputs],
            "e2els": [out.latency if out.success else None for out in outputs],
            "itls": [out.itl if out.success else [] for out in outputs],
            "start_times": [out.start_time for out in outputs],
            "errors": [out.error for out in outputs],
            "generated_texts": [out.generated_text for out in outputs],
        },
    )


def _reason(error: str) -> str:
    """Group failures: the same error with different request ids or numbers should count as one reason."""
    return (error or "unknown error").splitlines()[0][:160]


def peak_concurrency(outputs: list[RequestOutput]) -> int:
    """Most requests in flight at once (sweep over half-open [start, end) intervals)."""
    events = sorted([(o.start_time, 1) for o in outputs] + [(o.start_time + o.latency, -1) for o in outputs])
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def token_rate_series(
    outputs: list[RequestOutput], output_lens: list[int], bucket_s: float, t0: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Output tokens per second in buckets of ``bucket_s`` from ``t0``; returns (rates, bucket start times).

    A chunk may carry several tokens; each request's token count (from usage) is spread evenly over its chunks.
    """
    times, weights = [], []
    for out, n in zip(outputs, output_lens):
        if out.chunk_times and n:
            times.append(np.asarray(out.chunk_times))
            weights.append(np.full(len(out.chunk_times), n / len(out.chunk_times)))
    if not times:
        return np.zeros(0), np.zeros(0)
    all_times, all_weights = np.concatenate(times), np.concatenate(weights)
    start = min(o.start_time for o in outputs) if t0 is None else t0
    rel = all_times - start
    n_buckets = int(np.floor(rel.max() / bucket_s)) + 1
    sums = np.bincount(np.floor(rel / bucket_s).astype(np.int64), weights=all_weights, minlength=n_buckets)
    return sums / bucket_s, np.arange(n_buckets) * bucket_s


def concurrency_series(outputs: list[RequestOutput], t0: float, grid: np.ndarray) -> np.ndarray:
    """Requests in flight at each time of ``grid`` (seconds after ``t0``)."""
    starts = np.sort([o.start_time - t0 for o in outputs if o.started])
    ends = np.sort([(o.end_time or np.inf) - t0 for o in outputs if o.started])
    return np.searchsorted(starts, grid, side="right") - np.searchsorted(ends, grid, side="right")


def format_table(metrics: BenchmarkMetrics, config: dict[str, Any], selected: list[str]) -> str:
    """The ``vllm bench serve`` result block, plus failure reasons and std/p90 lines."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        text = "n/a" if value is None else format(value, fmt)
        lines.append(f"{label:<40} {text:<10}")

    row("Successful requests:", metrics.completed)
    row("Failed requests:", metrics.failed)
    if metrics.incomplete:
        row("Unfinished at --duration limit:", metrics.incomplete)
    if config.get("max_concurrency") is not None:
        row("Maximum request concurrency:", config["max_concurrency"])
    if config.get("request_rate") != float("inf"):
        row("Request rate configured (RPS):", config["request_rate"], ".2f")
    row("Benchmark duration (s):", metrics.duration, ".2f")
    row("Total input tokens:", metrics.total_input_tokens)
    row("Total generated tokens:", metrics.total_output_tokens)
    row("Request throughput (req/s):", metrics.request_throughput, ".2f")
    row("Output token throughput (tok/s):", metrics.output_throughput, ".2f")
    row("Peak output token throughput (tok/s):", metrics.max_output_tokens_per_s, ".2f")
    row("Peak concurrent requests:", metrics.max_concurrent_requests)
    row("Total token throughput (tok/s):", metrics.total_token_throughput, ".2f")
    for metric in selected:
        stats = metrics.latencies_ms[metric]
        lines.append("{s:{c}^{n}}".format(s=LATENCY_METRICS[metric], n=50, c="-"))
        label = _LABELS[metric]
        row(f"Mean {label} (ms):", stats["mean"], ".2f")
        row(f"Median {label} (ms):", stats["median"], ".2f")
        row(f"Std {label} (ms):", stats["std"], ".2f")
        for key, value in stats.items():
            if key.startswith("p") and key != "p50":  # p50 is the median, already shown
                row(f"P{key[1:]} {label} (ms):", value, ".2f")
    if metrics.failure_reasons:
        lines.append("{s:{c}^{n}}".format(s="Failure reasons", n=50, c="-"))
        lines.extend(f"{count:>6} x {reason}" for reason, count in metrics.failure_reasons.items())
    lines.append("=" * 50)
    return "\n".join(lines)
