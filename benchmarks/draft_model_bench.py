"""Draft-model speculative decoding mechanics (issue 9): the cost of a verify step against a plain decode step, and
the speed when every draft is accepted, so the overhead is known.

Three engines per ``k``, each timed at every batch size (random prompts, greedy, ``ignore_eos``):

* ``plain``: no speculation (decode steps replay CUDA graphs);
* ``draft``: the draft model. With dummy weights the draft and the target share nothing, so acceptance is ~0 and
  each step emits one token: the step time is pure overhead (k draft forwards + a verify forward of 1 + k tokens per
  sequence with the draft's catch-up on them, both in CUDA graphs unless ``--enforce-eager``);
* ``self``: the target's own files as the draft (same seed, so identical dummy weights): every draft is accepted
  (up to numerical ties), the best case for the mechanics.

Only steps after every sequence has finished its prefill are timed. Per step: ``propose_ms`` is the draft's k
single-token forwards (timed to its one device -> host copy), ``verify_ms`` the rest of the step (scheduling, the
target's verify forward, the draft's catch-up on the same tokens, rejection sampling, the step's sync).

    python -m benchmarks.draft_model_bench --model ../shared/models/llama-3.1-8b \\
        --draft-model ../shared/models/llama-3.2-1b --load-format dummy [--batch-sizes 1 16] [--ks 3 5]
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time

import numpy as np

from benchmarks.json_lines import append_json_line


def _make_engine(args: argparse.Namespace, draft: str | None, k: int):
    from core.engine import EngineCore
    from ipc.messages import EngineConfig

    engine_args = dict(model=args.model, max_model_len=args.max_model_len, max_num_seqs=max(args.batch_sizes),
                       seed=args.seed)
    if args.load_format:
        engine_args["load_format"] = args.load_format
    if args.num_gpu_blocks_override:
        engine_args["num_gpu_blocks_override"] = args.num_gpu_blocks_override
    if args.enforce_eager:
        engine_args["enforce_eager"] = True
    if draft is not None:
        engine_args["speculative_config"] = {"method": "draft_model", "model": draft, "num_speculative_tokens": k}
    return EngineCore(EngineConfig(**engine_args))


def _time_batch(engine, batch_size: int, args: argparse.Namespace, tag: str) -> dict:
    """Run ``batch_size`` requests to the end; time the decode-phase steps."""
    import torch

    from ipc.messages import EngineRequest, SamplingParams

    rng = np.random.default_rng(args.seed + batch_size)
    vocab = engine.runner.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(batch_size):
        prompt = rng.integers(10, vocab - 10, args.input_len).tolist()
        engine.add_request(EngineRequest(f"{tag}-{batch_size}-{i}", prompt, params))
    proposer = engine.proposer
    propose_seconds = [0.0]
    if proposer is not None and hasattr(proposer, "catch_up"):
        original = proposer.propose

        def timed_propose(*a, **kw):
            start = time.perf_counter()
            out = original(*a, **kw)  # ends with the drafts' device -> host copy: no extra sync needed
            propose_seconds[0] += time.perf_counter() - start
            return out

        proposer.propose = timed_propose
    started: set[str] = set()
    steps = tokens = 0
    decode_seconds = 0.0
    stats_before = None
    try:
        while engine.has_work():
            decoding = len(started) == batch_size
            if decoding and stats_before is None:
                stats_before = engine.get_stats()
                propose_seconds[0] = 0.0
            start = time.perf_counter()
            out = engine.step()
            if engine.runner.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            new_tokens = sum(len(o.new_token_ids) for o in out.outputs)
            started.update(o.request_id for o in out.outputs if o.new_token_ids)
            if decoding and new_tokens:
                steps += 1
                tokens += new_tokens
                decode_seconds += elapsed
    finally:
        if proposer is not None and hasattr(proposer, "catch_up"):
            del proposer.propose
    after = engine.get_stats()
    before = stats_before or after
    draft_tokens = after.get("spec_num_draft_tokens", 0) - before.get("spec_num_draft_tokens", 0)
    accepted = after.get("spec_num_accepted_tokens", 0) - before.get("spec_num_accepted_tokens", 0)
    step_ms = 1000 * decode_seconds / max(steps, 1)
    propose_ms = 1000 * propose_seconds[0] / max(steps, 1)
    return {
        "batch_size": batch_size, "decode_steps": steps, "output_tokens": tokens,
        "step_ms": round(step_ms, 3), "propose_ms": round(propose_ms, 3), "verify_ms": round(step_ms - propose_ms, 3),
        "tokens_per_seq_step": round(tokens / max(steps, 1) / batch_size, 3),
        "tok_per_s": round(tokens / decode_seconds, 1) if decode_seconds else 0.0,
        "acceptance_rate": round(accepted / draft_tokens, 4) if draft_tokens else None,
    }


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    configs = [("plain", None, 0)]
    for k in args.ks:
        configs += [("draft", args.draft_model, k), ("self", args.model, k)]
    rows: list[dict] = []
    plain_ms: dict[int, float] = {}
    print(f"{'config':>7} {'k':>2} {'batch':>5} {'step ms':>8} {'verify':>8} {'propose':>8} {'vs plain':>8} "
          f"{'tok/step':>8} {'tok/s':>9} {'accept':>7}")
    for name, draft, k in configs:
        engine = _make_engine(args, draft, k)
        _time_batch(engine, 1, argparse.Namespace(**{**vars(args), "output_len": 4}), "warmup")
        for batch_size in args.batch_sizes:
            r = {"config": name, "k": k, **_time_batch(engine, batch_size, args, name)}
            if name == "plain":
                plain_ms[batch_size] = r["step_ms"]
            base = plain_ms.get(batch_size)
            r["step_vs_plain"] = round(r["step_ms"] / base, 3) if base else None
            rows.append(r)
            print(f"{name:>7} {k:>2} {batch_size:>5} {r['step_ms']:>8.2f} {r['verify_ms']:>8.2f} "
                  f"{r['propose_ms']:>8.2f} {r['step_vs_plain'] or 0:>7.2f}x {r['tokens_per_seq_step']:>8.2f} "
                  f"{r['tok_per_s']:>9.1f} {r['acceptance_rate'] if r['acceptance_rate'] is not None else '-':>7}")
            append_json_line(args.json, {"benchmark": "draft_model_mechanics", "model": args.model,
                                         "draft_model": draft, **r})
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Target model directory (e.g. Llama-3.1-8B).")
    p.add_argument("--draft-model", required=True, help="Draft model directory (e.g. Llama-3.2-1B).")
    p.add_argument("--load-format", default=None, help="dummy: random weights (no files read).")
    p.add_argument("--ks", type=int, nargs="+", default=[3], help="num_speculative_tokens values.")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true", help="No CUDA graphs for the plain decode steps.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="Append one JSON object per row to this file.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
