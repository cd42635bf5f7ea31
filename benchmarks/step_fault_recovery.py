"""What a failed engine step costs the other requests (issue 17: a step that raises fails its culprit alone).

Runs W1's requests (shared/BENCHMARKS.md draws, greedy so outputs can be compared) through an in-process
``EngineCore`` twice: clean, then with ``--faults`` requests made to raise inside a step once they have decoded
``--fault-after`` tokens (the same hook as ``PAGEDSERVE_TEST_STEP_FAULT_TOKENS``, keyed by request here). Recovery
puts every running sequence back to waiting and runs the suspects one at a time, so the cost is the recompute of
every running sequence's KV plus a few single-request steps per fault. Reports both runs' output tok/s, the
slowdown, the time from each fault until its culprit was failed and its episode over, and checks that every
surviving request produced exactly the clean run's tokens.

    python -m benchmarks.step_fault_recovery --model ../shared/models/qwen3-0.6b --load-format dummy --faults 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks.json_lines import append_json_line
from benchmarks.throughput import make_workload
from core.step_recovery import InjectedStepFault
from ipc.messages import EngineConfig, EngineRequest, SamplingParams


class _FaultAfter:
    """Raises in every step that schedules one of ``culprits`` once it has ``after`` output tokens."""

    enabled = True

    def __init__(self, engine, culprits: set[str], after: int) -> None:
        self.engine, self.culprits, self.after = engine, culprits, after
        self.fired_at: dict[str, float] = {}

    def check(self, prompts) -> None:
        for request_id, _ in prompts:
            if request_id in self.culprits:
                seqs = self.engine._children.get(request_id, [])
                if seqs and seqs[0].num_output_tokens >= self.after:  # every time: a bug that follows the request
                    self.fired_at.setdefault(request_id, time.perf_counter())
                    raise InjectedStepFault(f"benchmark fault for request {request_id}")


def run(engine, prompts: list[list[int]], max_tokens: list[int], faults: _FaultAfter | None) -> dict:
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(EngineRequest(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=n,
                                                                        ignore_eos=True)))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    failed: dict[str, float] = {}
    preemptions_before = engine.scheduler.total_preemptions
    start = time.perf_counter()
    while engine.has_work():
        out = engine.step()
        now = time.perf_counter()
        for o in out.outputs:
            tokens[o.request_id].extend(o.new_token_ids)
        for e in out.errors:
            failed[e.request_id] = now
    elapsed = time.perf_counter() - start
    generated = sum(len(t) for rid, t in tokens.items() if rid not in failed)
    result = {"elapsed_s": elapsed, "output_tokens": generated, "output_tok_per_s": generated / elapsed,
              "failed_requests": sorted(failed, key=int),
              "recomputed_sequences": engine.scheduler.total_preemptions - preemptions_before, "tokens": tokens}
    if faults is not None:
        result["fault_to_failed_s"] = [failed[r] - faults.fired_at[r] for r in sorted(faults.fired_at)
                                       if r in failed]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
    parser.add_argument("--faults", type=int, default=4, help="requests made to fail inside a step")
    parser.add_argument("--fault-after", type=int, default=50, help="output tokens before a culprit's fault")
    parser.add_argument("--scale-output", type=float, default=1.0,
                        help="multiply W1's output lengths (CPU smoke runs use a small fraction)")
    parser.add_argument("--json", help="append the result to this JSON-lines file")
    args = parser.parse_args(argv)

    from core.engine import EngineCore

    workload = make_workload("W1", args.num_prompts)
    max_tokens = [max(args.fault_after + 2, int(n * args.scale_output)) for n in workload.max_tokens]
    prompts = [p[: args.max_model_len - max(max_tokens)] for p in workload.prompts]
    config = EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype,
                          max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          num_gpu_blocks_override=args.num_gpu_blocks_override, skip_tokenizer_init=True)
    engine = EngineCore(config)
    run(engine, [[1 + i] * 64 for i in range(4)], [8] * 4, None)  # warm-up (kernels, graphs)
    engine.reset_prefix_cache()
    clean = run(engine, prompts, max_tokens, None)
    engine.reset_prefix_cache()
    step = max(1, len(prompts) // max(1, args.faults))
    culprits = {str(i) for i in range(0, len(prompts), step)} if args.faults else set()
    culprits = set(sorted(culprits, key=int)[: args.faults])
    faults = _FaultAfter(engine, culprits, args.fault_after)
    engine._faults = faults
    faulty = run(engine, prompts, max_tokens, faults)
    engine._faults.enabled = False
    lossless = all(faulty["tokens"][r] == clean["tokens"][r] for r in clean["tokens"] if r not in culprits)
    record = {
        "benchmark": "step_fault_recovery", "model": args.model, "num_prompts": len(prompts),
        "faults": sorted(culprits, key=int), "failed": faulty["failed_requests"],
        "clean_tok_per_s": clean["output_tok_per_s"], "faulty_tok_per_s": faulty["output_tok_per_s"],
        "slowdown": clean["output_tok_per_s"] / faulty["output_tok_per_s"] if faulty["output_tok_per_s"] else None,
        "extra_s": faulty["elapsed_s"] - clean["elapsed_s"] * faulty["output_tokens"] / clean["output_tokens"],
        "fault_to_failed_s": faulty["fault_to_failed_s"], "recomputed_sequences": faulty["recomputed_sequences"],
        "survivors_identical": lossless,
    }
    print(json.dumps(record))
    append_json_line(args.json, record)
    ok = lossless and sorted(faulty["failed_requests"]) == sorted(culprits)
    if not ok:
        print("FAILED: survivors differ from the clean run or the wrong requests failed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
