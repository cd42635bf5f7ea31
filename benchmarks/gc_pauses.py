"""Garbage-collector pauses in the engine core's step loop on a W5-like run, with and without the startup freeze.

Each mode runs in a fresh interpreter: build an ``EngineCore``, then (``frozen``) ``freeze_startup_heap()`` as the
engine-core process does once warm, or (``default``) leave CPython's settings; then admit requests of random
prompt tokens as W5 does (concurrency-many at first, a new one as each finishes) and step until done, timing every
collection (``GcPauseRecorder``) and every step. A pause inside a step adds to that step, i.e. to the gap between
two tokens of every running stream.

    python -m benchmarks.gc_pauses --model DIR --load-format dummy --num-prompts 512 --concurrency 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    """One mode, in this process: the pause and step statistics."""
    import random

    import numpy as np

    from core.engine import EngineCore
    from core.gc_tuning import GcPauseRecorder, freeze_startup_heap
    from ipc.messages import EngineConfig, EngineRequest, SamplingParams

    config = EngineConfig(model=args.model, load_format=args.load_format, max_model_len=args.max_model_len,
                          max_num_seqs=args.concurrency, enforce_eager=True,
                          **({"num_gpu_blocks_override": args.num_gpu_blocks} if args.num_gpu_blocks else {}))
    core = EngineCore(config)
    frozen = freeze_startup_heap() if mode == "frozen" else 0
    recorder = GcPauseRecorder().install()
    rng = random.Random(0)
    vocab = 1000
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    submitted = finished = 0

    def submit() -> None:
        nonlocal submitted
        prompt = [rng.randrange(10, vocab) for _ in range(args.input_len)]
        core.add_request(EngineRequest(str(submitted), prompt, params))
        submitted += 1

    for _ in range(min(args.concurrency, args.num_prompts)):
        submit()
    step_s: list[float] = []
    started = time.perf_counter()
    while core.has_work():
        t0 = time.perf_counter()
        out = core.step()
        step_s.append(time.perf_counter() - t0)
        done = sum(1 for o in out.outputs if o.finish_reason is not None)
        finished += done
        for _ in range(min(done, args.num_prompts - submitted)):
            submit()
    wall = time.perf_counter() - started
    recorder.uninstall()
    steps = np.asarray(step_s) * 1000
    return {"mode": mode, "frozen_objects": frozen, "requests": finished, "steps": len(step_s), "wall_s": wall,
            "step_p50_ms": float(np.percentile(steps, 50)), "step_p99_ms": float(np.percentile(steps, 99)),
            "step_max_ms": float(steps.max()),
            "gc_count": recorder.count, "gc_total_ms": [t * 1000 for t in recorder.total_s],
            "gc_max_ms": [t * 1000 for t in recorder.max_s]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--num-gpu-blocks", type=int, default=None)
    parser.add_argument("--modes", nargs="+", default=["default", "frozen"], choices=["default", "frozen"])
    parser.add_argument("--one-mode", default=None, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args(argv)
    if args.one_mode:
        print(json.dumps(run_mode(args, args.one_mode)))
        return
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for mode in args.modes:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gc_pauses", *passthrough, "--one-mode", mode],
                              cwd=REPO, capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        gc_line = ", ".join(f"gen{g} {result['gc_count'][g]}x total {result['gc_total_ms'][g]:.1f} ms max "
                            f"{result['gc_max_ms'][g]:.2f} ms" for g in range(3))
        print(f"{mode}: {result['requests']} requests, {result['steps']} steps in {result['wall_s']:.1f} s; step "
              f"p50/p99/max {result['step_p50_ms']:.1f}/{result['step_p99_ms']:.1f}/{result['step_max_ms']:.1f} ms; "
              f"frozen objects {result['frozen_objects']}; GC {gc_line}")


if __name__ == "__main__":
    main()
