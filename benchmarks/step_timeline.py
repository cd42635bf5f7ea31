"""Where a throughput run's time goes, step by step: every engine step of a workload timed (wall, between step
returns) with what it ran (prefill tokens, decodes and their contexts), summed by kind of step and set against that
step's own lower bound (``benchmarks/roofline.py``'s terms for one step: the decodes' KV reads at the copy bandwidth
plus the linear layers' FLOPs or one read of the weights, whichever is larger).

A run whose total is far above ``roofline``'s bound shows here in which steps: the prefill phase, the full-batch
decode steps, or the draining tail of small batches.

    python -m benchmarks.step_timeline --workload W2 --model .models/gemma-2-9b --load-format dummy

With async scheduling a step returns while the next one runs, so each timed interval is one step of device time
in the steady state; the step it is charged to is the one scheduled in that call.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from benchmarks.json_lines import append_json_line
from benchmarks.roofline import H200_BF16_FLOPS, H200_COPY_BYTES_PER_S, kv_read_bytes, load_model_config, step_linear_s
from benchmarks.throughput import make_workload

DECODE_BINS = ((1, 31), (32, 127), (128, 255), (256, 1 << 30))


@dataclass
class StepRecord:
    seconds: float
    prefill_tokens: int
    decode_contexts: list[int] = field(default_factory=list)


def step_bound(cfg, record: StepRecord, *, kv_bytes: int = 2, weight_bytes: float = 2,
               bandwidth: float = H200_COPY_BYTES_PER_S, flops: float = H200_BF16_FLOPS) -> float:
    """The step's lower bound in seconds: KV reads of its decodes + its linear layers (FLOPs or a weight read)."""
    decodes = len(record.decode_contexts)
    sampled = decodes + (1 if record.prefill_tokens else 0)
    linear = step_linear_s(cfg, record.prefill_tokens + decodes, sampled, weight_bytes=weight_bytes,
                           bandwidth=bandwidth, flops=flops)
    return kv_read_bytes(cfg, np.asarray(record.decode_contexts), kv_bytes) / bandwidth + float(linear)


def summarize(cfg, records: list[StepRecord], kv_bytes: int = 2) -> list[dict]:
    """One row per kind of step: prefill (any prefill tokens), then decode-only steps by batch size."""
    kinds: list[tuple[str, list[StepRecord]]] = [("prefill or mixed", [r for r in records if r.prefill_tokens])]
    for lo, hi in DECODE_BINS:
        label = f"decode {lo}-{hi}" if hi < 1 << 30 else f"decode {lo}+"
        kinds.append((label, [r for r in records if not r.prefill_tokens and lo <= len(r.decode_contexts) <= hi]))
    rows = []
    for label, group in kinds:
        if not group:
            continue
        seconds = sum(r.seconds for r in group)
        bound = sum(step_bound(cfg, r, kv_bytes=kv_bytes) for r in group)
        tokens = sum(len(r.decode_contexts) for r in group)
        rows.append({"kind": label, "steps": len(group), "seconds": round(seconds, 3), "bound_s": round(bound, 3),
                     "of_bound": round(bound / seconds, 3) if seconds else None, "decode_tokens": tokens,
                     "prefill_tokens": sum(r.prefill_tokens for r in group)})
    return rows


def run_timeline(args: argparse.Namespace) -> list[StepRecord]:
    from frontend import LLM, SamplingParams
    from ipc.messages import EngineRequest

    engine_args = dict(max_model_len=args.max_model_len, skip_tokenizer_init=True, kv_cache_dtype=args.kv_cache_dtype)
    if args.load_format:
        engine_args["load_format"] = args.load_format
    if args.device:
        engine_args["device"] = args.device
    llm = LLM(args.model, **engine_args)
    engine = llm.engine
    workload = make_workload(args.workload, args.num_prompts)
    for i, prompt in enumerate(workload.prompts[: args.warmup_prompts]):  # compile the kernels' shapes outside the timed run
        # reversed, so the timed prompts find nothing of theirs in the prefix cache
        engine.add_request(EngineRequest(f"warm-{i}", prompt[::-1], SamplingParams(temperature=0.0, max_tokens=8)))
    while engine.has_work():
        engine.step()
    for run in ("warm-run-", "") if args.warm else ("",):  # --warm: the timed run finds its prompts cached
        for i, (prompt, max_tokens) in enumerate(zip(workload.prompts, workload.max_tokens)):
            params = SamplingParams(temperature=workload.temperature, max_tokens=max_tokens, ignore_eos=True)
            engine.add_request(EngineRequest(f"{run}{i}", prompt, params))
        if run:
            while engine.has_work():
                engine.step()
    scheduled: list = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda *a, **kw: scheduled.append(schedule(*a, **kw)) or scheduled[-1]
    records: list[StepRecord] = []
    last = time.perf_counter()
    while engine.has_work():
        before = len(scheduled)
        engine.step()
        now = time.perf_counter()
        record = StepRecord(now - last, 0)
        for output in scheduled[before:]:
            for s in output.scheduled:
                if s.num_tokens == 1 and not s.spec_token_ids:
                    record.decode_contexts.append(s.start + 1)
                else:
                    record.prefill_tokens += s.num_tokens
        records.append(record)
        last = now
    engine.scheduler.schedule = schedule
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="W2")
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--warmup-prompts", type=int, default=16, help="short requests run before the timed run")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8 (the bound then counts 1-byte KV reads)")
    p.add_argument("--warm", action="store_true",
                   help="run the workload once untimed first, so the timed run finds its prompts in the prefix cache "
                        "(BENCHMARKS.md's warm figures)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_model_config(args.model)
    records = run_timeline(args)
    total = sum(r.seconds for r in records)
    output_tokens = sum(len(r.decode_contexts) for r in records)
    print(f"{args.workload} on {args.model}: {len(records)} steps, {total:.2f} s, "
          f"{output_tokens / total:,.0f} decode tok/s")
    print(f"{'kind':<18} {'steps':>6} {'seconds':>8} {'bound s':>8} {'of bound':>9} {'decodes':>8} {'prefill':>8}")
    rows = summarize(cfg, records, kv_bytes=1 if args.kv_cache_dtype.startswith("fp8") else 2)
    for row in rows:
        print(f"{row['kind']:<18} {row['steps']:>6} {row['seconds']:>8.2f} {row['bound_s']:>8.2f} "
              f"{row['of_bound'] or 0:>9.2f} {row['decode_tokens']:>8} {row['prefill_tokens']:>8}")
    append_json_line(args.json, {"workload": args.workload, "model": args.model, "seconds": round(total, 3),
                                 "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
