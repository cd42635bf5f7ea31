"""PNG plots of a serving benchmark: latency CDFs and throughput over time (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.openai_client import RequestOutput  # noqa: E402
from benchmarks.serve_metrics import LATENCY_METRICS, concurrency_series, token_rate_series  # noqa: E402


def plot_latency_cdfs(outputs: list[RequestOutput], output_lens: list[int], path: Path, title: str) -> Path:
    """One panel per latency (TTFT, TPOT, ITL, E2E): the empirical CDF with p50 and p99 marked."""
    ok = [(o, n) for o, n in zip(outputs, output_lens) if o.success]
    samples = {
        "ttft": [o.ttft for o, _ in ok],
        "tpot": [(o.latency - o.ttft) / (n - 1) for o, n in ok if n > 1],
        "itl": [gap for o, _ in ok for gap in o.itl],
        "e2el": [o.latency for o, _ in ok],
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (metric, values) in zip(axes.flat, samples.items()):
        ax.set_title(LATENCY_METRICS[metric], fontsize=10)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        if not values:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
            continue
        ms = np.sort(np.asarray(values) * 1000.0)
        ax.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post")
        for p, style, side in ((50, "--", "left"), (99, ":", "right")):
            value = float(np.percentile(ms, p))
            ax.axvline(value, color="gray", linestyle=style, linewidth=1)
            ax.annotate(f"p{p} {value:.1f}", (value, p / 100 - 0.05), fontsize=8, ha=side,
                        xytext=(4 if side == "left" else -4, 0), textcoords="offset points")
        ax.set_ylim(0, 1.02)
    fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.07, right=0.97, bottom=0.08, top=0.9, wspace=0.22, hspace=0.38)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_throughput(outputs: list[RequestOutput], output_lens: list[int], t0: float, duration: float, path: Path,
                    title: str) -> Path:
    """Output tokens/s and requests in flight over the run."""
    ok = [(o, n) for o, n in zip(outputs, output_lens) if o.success]
    bucket = 1.0 if duration >= 30 else max(duration / 30.0, 0.05)
    rates, starts = token_rate_series([o for o, _ in ok], [n for _, n in ok], bucket_s=bucket, t0=t0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    top.set_title(f"Output tokens/s ({bucket:.2g} s buckets)", fontsize=10)
    if rates.size:  # repeat the last value so the last bucket is drawn with its width
        top.step(np.append(starts, starts[-1] + bucket), np.append(rates, rates[-1]), where="post")
    top.set_ylabel("tokens/s")
    top.grid(alpha=0.3)
    grid = np.linspace(0.0, max(duration, 1e-3), 400)
    bottom.step(grid, concurrency_series(outputs, t0, grid), where="post", color="tab:orange")
    bottom.set_title("Requests in flight", fontsize=10)
    bottom.set_xlabel("seconds since the first request")
    bottom.set_ylabel("requests")
    bottom.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.08, top=0.9, hspace=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
