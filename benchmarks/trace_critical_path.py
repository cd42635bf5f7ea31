"""Where a step's time goes when its kernels overlap: each GPU event charged with how far it moved the end of the
work, read from a Chrome trace of ``benchmarks/profile_step.py --trace``.

    python -m benchmarks.profile_step --model .models/llama-3.1-8b --workload W3 --quantization fp8 \
        --steps 6 --trace w3.json          # on the GPU
    python benchmarks/trace_critical_path.py w3.json --steps 6

Why: with programmatic dependent launch (``kernels/pdl.py``) a kernel starts while the one before it still runs and
waits inside, so a profiler's kernel durations overlap and overstate what each kernel costs (W3-fp8: 4.78 ms of
"GPU busy" in a 3.08 ms step). The kernels still finish in order, one chain: the gap between an event's end and the
end of the event before it is the time that event added to the step. Summed per name and divided by the steps, the
deltas add up to the profiled span's wall time, no overlap counted twice.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import statistics
import sys
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def gpu_events(trace: dict) -> list[dict]:
    """The trace's GPU events (kernels, copies, memsets), by end time."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]
    return sorted(events, key=lambda e: e["ts"] + e["dur"])


def critical_path(events: list[dict]) -> dict[str, list[float]]:
    """Per event name, the microseconds each of its events moved the latest end time forward (0 for an event that
    ended before one already seen: it overlapped entirely). The first event only sets the start."""
    deltas: dict[str, list[float]] = collections.defaultdict(list)
    latest = None
    for event in events:
        end = event["ts"] + event["dur"]
        if latest is not None:
            deltas[event["name"]].append(max(0.0, end - latest))
        latest = end if latest is None else max(latest, end)
    return deltas


def load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="profile_step --trace output (.json or .json.gz)")
    parser.add_argument("--steps", type=int, default=1, help="the profiled steps, to print per-step totals")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    deltas = critical_path(gpu_events(load(args.trace)))
    total = sum(sum(v) for v in deltas.values())
    print(f"{total / args.steps / 1e3:.3f} ms per step on the chain ({args.steps} steps)")
    print(f"{'ms/step':>8} {'calls/step':>10} {'median us':>9}  name")
    ranked = sorted(deltas.items(), key=lambda kv: -sum(kv[1]))
    for name, values in ranked[: args.top]:
        print(f"{sum(values) / args.steps / 1e3:8.3f} {len(values) / args.steps:10.1f} "
              f"{statistics.median(values):9.2f}  {name[:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
