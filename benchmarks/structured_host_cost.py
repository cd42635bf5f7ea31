"""Where structured outputs spend engine time: the same requests unconstrained and under ``json_object``, through
an in-process EngineCore, with the engine thread's time in the grammar work per step: ``prepare_s`` (hand the previous tokens and this step's
rows to the grammar threads), ``mask_fill_s`` (wait for / fill the masks, upload), ``accept_s`` (matchers advanced on
the engine thread), ``mask_apply_s`` (the mask op; on CUDA only its launch).

    python -m benchmarks.structured_host_cost --model .models/smollm2-135m --load-format dummy --num-requests 256

On CPU (``--device cpu``, a tiny model) it measures the host side alone: greedy by default, so the CPU sampler's
noise does not drown the grammar's cost. ``--per-sequence`` uses one xgrammar call per sequence instead of the
batched calls (the old path), for a before/after on the same build.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import time


def _timed(totals: dict, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t0
            totals[name + "_calls"] += 1

    return wrapper


def run(args: argparse.Namespace) -> dict:
    import core.sampler
    from core.engine import EngineCore
    from ipc.messages import EngineConfig, EngineRequest, SamplingParams, StructuredOutputsParams

    engine = EngineCore(EngineConfig(model=args.model, load_format=args.load_format, device=args.device,
                                     max_num_seqs=args.num_requests, max_model_len=args.max_model_len,
                                     num_gpu_blocks_override=args.num_blocks, seed=0,
                                     async_scheduling=None if args.async_scheduling is None
                                     else args.async_scheduling == "on"))
    if args.per_sequence:
        engine.structured.batched = False
    if args.grammar_threads is not None:
        engine.structured.overlap = args.grammar_threads == "on"
    totals: dict = collections.defaultdict(float)
    engine.structured.bitmask = _timed(totals, "mask_fill_s", engine.structured.bitmask)
    engine.structured.accept = _timed(totals, "accept_s", engine.structured.accept)
    if hasattr(engine.structured, "prepare"):  # absent before the grammar threads: lets it time an older build
        engine.structured.prepare = _timed(totals, "prepare_s", engine.structured.prepare)
    core.sampler.apply_token_bitmask = _timed(totals, "mask_apply_s", core.sampler.apply_token_bitmask)
    prompts = [[1 + (7 * i + j) % 1000 for j in range(args.prompt_len)] for i in range(args.num_requests)]
    json_object = StructuredOutputsParams(json_object=True)
    passes = {
        "unconstrained": SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True),
        "json_object": SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                                      structured_outputs=json_object),
    }

    def generate(params: SamplingParams, prompts: list[list[int]], tag: str) -> tuple[int, int]:
        for i, prompt in enumerate(prompts):
            engine.add_request(EngineRequest(f"{tag}-{i}", prompt, params))
        tokens = steps = 0
        while engine.has_work():
            tokens += sum(len(o.new_token_ids) for o in engine.step().outputs)
            steps += 1
        return tokens, steps

    for name, params in passes.items():  # warm-up: kernels and the grammar's compile
        generate(params, prompts[:2], f"warm-{name}")
    result: dict = {"num_requests": args.num_requests, "per_sequence": args.per_sequence, "device": args.device,
                    "grammar_threads": engine.structured.overlap}
    for name, params in passes.items():
        totals.clear()
        t0 = time.perf_counter()
        tokens, steps = generate(params, prompts, name)
        elapsed = time.perf_counter() - t0
        result[name] = {"output_tokens": tokens, "steps": steps, "elapsed_s": elapsed,
                        "output_tok_per_s": tokens / elapsed, "step_ms": 1e3 * elapsed / steps,
                        **{k: (v if k.endswith("_calls") else 1e3 * v / steps) for k, v in totals.items()}}
    result["json_object_slowdown"] = 1 - (result["json_object"]["output_tok_per_s"]
                                          / result["unconstrained"]["output_tok_per_s"])
    engine.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(prog="python -m benchmarks.structured_host_cost", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: profiled on GPU)")
    p.add_argument("--async-scheduling", choices=("on", "off"), default=None)
    p.add_argument("--per-sequence", action="store_true", help="one xgrammar call per sequence (the old path)")
    p.add_argument("--grammar-threads", choices=("on", "off"), default=None,
                   help="accept/fill on grammar threads overlapping the engine thread (default: on with >= 4 CPUs)")
    p.add_argument("--json", default=None, help="append the result (one JSON object per line) to this file")
    args = p.parse_args(argv)
    result = run(args)
    for name in ("unconstrained", "json_object"):
        r = result[name]
        grammar = "  ".join(f"{k} {r[k]:.3f}" for k in ("prepare_s", "mask_fill_s", "accept_s", "mask_apply_s")
                            if k in r)
        print(f"{name:>13}: {r['output_tok_per_s']:.1f} out tok/s, {r['steps']} steps, {r['step_ms']:.2f} ms/step"
              + (f"  (per step, ms: {grammar})" if grammar else ""))
    print(f"json_object slowdown: {100 * result['json_object_slowdown']:.1f}%")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({**result, "args": vars(args)}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
