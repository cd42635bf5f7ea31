"""Pipeline-parallel micro-batching: one greedy offline workload through ``pipeline_parallel_size`` P with one step
at a time (``--pipeline-micro-batches 1``: each stage idle (P-1)/P of the time) and with P micro-batches in flight
(the default), optionally on one device too. Reports wall time and output tokens/s per setting, and checks every
setting produced the same greedy tokens.

Throughput = generated tokens / wall time of ``LLM.generate`` (load and a warm-up excluded); the median of
``--runs``. Each setting runs in a fresh ``LLM`` (its workers and process group are shut down before the next).

    # two GPUs, from the repository root with the configs in .models/ (cp -r ../shared/models .models): Llama-3.1-8B
    # shapes, random weights, a decode-heavy batch
    python -m benchmarks.pipeline_micro_batches --model .models/llama-3.1-8b --load-format dummy --dtype bfloat16 \
        -pp 2 --single-device --num-prompts 256 --input-len 512 --output-len 256 --json pp_micro_batches.jsonl
    # CPU (gloo, one worker process per extra stage): a tiny model, each stage with real work
    python -m benchmarks.pipeline_micro_batches --model TINY_LLAMA_DIR --dtype float32 -pp 2 --num-prompts 16 \
        --input-len 32 --output-len 32 --max-num-seqs 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def run_setting(args: argparse.Namespace, prompts: list[list[int]], pp: int, micro_batches: int | None) -> dict:
    from frontend import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        args.model, load_format=args.load_format, dtype=args.dtype, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, skip_tokenizer_init=True, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size if pp > 1 else 1, pipeline_parallel_size=pp,
        pipeline_micro_batches=micro_batches if pp > 1 else None, device=args.device,
    )
    startup = time.perf_counter() - start
    try:
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        inputs = [{"prompt_token_ids": p} for p in prompts]
        llm.generate([{"prompt_token_ids": [1 + i] * args.input_len} for i in range(min(4, len(prompts)))],
                     SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
        runs, tokens = [], None
        for _ in range(args.runs):
            llm.engine.reset_prefix_cache()
            t0 = time.perf_counter()
            outputs = llm.generate(inputs, params, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            tokens = [list(o.outputs[0].token_ids) for o in outputs]
            generated = sum(map(len, tokens))
            assert generated == len(prompts) * args.output_len, generated
            runs.append({"elapsed_s": elapsed, "output_tok_per_s": generated / elapsed})
    finally:
        llm.engine.shutdown()
    label = "one device" if pp == 1 else f"pp={pp} micro_batches={micro_batches}"
    median = statistics.median(r["output_tok_per_s"] for r in runs)
    print(f"{label:>28}: {statistics.median(r['elapsed_s'] for r in runs):8.2f} s  {median:10.1f} output tok/s  "
          f"(startup {startup:.1f} s)", flush=True)
    return {"pipeline_parallel_size": pp, "tensor_parallel_size": args.tensor_parallel_size if pp > 1 else 1,
            "pipeline_micro_batches": micro_batches, "runs": runs, "median_output_tok_per_s": median,
            "startup_s": startup, "tokens": tokens}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory or HF id")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=2)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="per stage (pp runs only)")
    p.add_argument("--micro-batches", default=None,
                   help="comma-separated pipeline_micro_batches settings to compare (default: 1,P)")
    p.add_argument("--single-device", action="store_true", help="also run pp=1 on one device")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="append one JSON object per setting to this file")
    args = p.parse_args(argv)
    if args.pipeline_parallel_size < 2:
        p.error("--pipeline-parallel-size must be at least 2")
    if args.max_model_len is None:
        args.max_model_len = args.input_len + args.output_len
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pp = args.pipeline_parallel_size
    settings: list[tuple[int, int | None]] = [(1, None)] if args.single_device else []
    micro = [int(m) for m in args.micro_batches.split(",")] if args.micro_batches else [1, pp]
    settings += [(pp, m) for m in micro]
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(0, 1000, size=args.input_len).tolist() for _ in range(args.num_prompts)]
    records = [run_setting(args, prompts, stage_count, m) for stage_count, m in settings]
    reference = records[0]["tokens"]
    same = all(r["tokens"] == reference for r in records)
    baseline = next((r for r in records if r["pipeline_micro_batches"] == 1), None)
    if baseline is not None:
        for r in records:
            if r["pipeline_micro_batches"] not in (None, 1):
                print(f"pp={pp} with {r['pipeline_micro_batches']} micro-batches: "
                      f"{r['median_output_tok_per_s'] / baseline['median_output_tok_per_s']:.2f}x one step at a time")
    print("greedy tokens identical across settings" if same else "GREEDY TOKENS DIFFER across settings")
    if args.json:
        with open(args.json, "a") as f:
            for r in records:
                f.write(json.dumps({**{k: v for k, v in r.items() if k != "tokens"}, "model": args.model,
                                    "num_prompts": args.num_prompts, "input_len": args.input_len,
                                    "output_len": args.output_len, "same_tokens": same}) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
