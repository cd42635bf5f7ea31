"""W1 with every request under ``response_format={"type": "json_object"}``, against unconstrained W1 (offline LLM).

    python -m benchmarks.structured_throughput --model ../shared/models/smollm2-135m --load-format dummy

Both passes run in one engine on the same requests. The unconstrained pass ignores EOS (exact W1); the constrained
pass stops where the grammar ends the object (a finished object only allows EOS), so it is compared by output
tokens per second, with the share of W1's tokens it produced. A third pass, ``unconstrained_same_lengths``, runs W1
unconstrained with each request cut to the length its constrained output had: fewer tokens per step in a long tail
is the workload's shape, not the grammar's cost, and this pass takes it out of the comparison. The grammar needs a
vocabulary: the model directory's tokenizer, or ``--tokenizer`` for a config-only directory. W1's own model,
Qwen3-0.6B, ships here without one, so its run borrows SmolLM2's with ``--vocab-from-tokenizer`` (dummy weights only):
the model keeps its layers but takes the tokenizer's vocabulary (49,152 ids, its EOS), as a real checkpoint's
tokenizer covers its vocabulary. Without it, Qwen3's 151,936 logits hold 102,784 ids that SmolLM2's tokenizer lacks;
xgrammar treats each as a special token to clear in every mask, ~100 us per row per step (real checkpoints pad a few
hundred ids at most):

    python -m benchmarks.structured_throughput --model ../shared/models/qwen3-0.6b --load-format dummy \
        --tokenizer ../shared/models/smollm2-135m --vocab-from-tokenizer
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.json_lines import append_json_line
from benchmarks.throughput import make_workload

MAX_MISSING_IDS = 1024  # real checkpoints pad their vocabulary past the tokenizer by a few hundred ids at most


def _config_and_tokenizer(model: str, tokenizer: str) -> tuple[dict, Any]:
    """``model``'s HF config and the tokenizer the engine would load for it with the ``tokenizer`` override."""
    from core.loader import load_hf_config
    from core.model_source import resolve_model
    from core.tokenizer import load_tokenizer

    source = resolve_model(model)
    return load_hf_config(source), load_tokenizer(source, tokenizer)


def model_with_tokenizer_vocab(model: str, tokenizer: str, directory: str) -> str:
    """A directory holding ``model``'s config.json with the vocabulary of ``tokenizer``: ``vocab_size`` = its length
    and its EOS as the model's (for dummy weights: the embedding and LM head take the new size)."""
    config, tok = _config_and_tokenizer(model, tokenizer)
    config["vocab_size"] = len(tok)
    config["eos_token_id"] = tok.eos_token_id
    Path(directory, "config.json").write_text(json.dumps(config))
    return directory


def _warn_on_vocabulary_gap(model: str, tokenizer: str) -> None:
    """A borrowed tokenizer far shorter than the model's vocabulary times xgrammar clearing the missing ids, not the
    grammar: say so (and how to avoid it) before the run."""
    config, tok = _config_and_tokenizer(model, tokenizer)
    vocab_size = config.get("vocab_size", 0)
    missing = vocab_size - len(tok)
    if missing > MAX_MISSING_IDS:
        print(f"warning: {missing} of the model's {vocab_size} ids are not in the tokenizer; xgrammar clears each in "
              "every mask, which this run will time (--vocab-from-tokenizer avoids it)", file=sys.stderr)


def run(args: argparse.Namespace) -> dict:
    from frontend import LLM, SamplingParams
    from ipc.messages import StructuredOutputsParams

    workload = make_workload("W1", args.num_prompts, args.seed)
    if args.grammar_switch_interval_us is not None:
        from core.structured_output import manager

        manager.GRAMMAR_SWITCH_INTERVAL_S = args.grammar_switch_interval_us / 1e6
    model = args.model
    if args.vocab_from_tokenizer:
        temporary = tempfile.TemporaryDirectory(prefix="pagedserve-vocab-")
        model = model_with_tokenizer_vocab(args.model, args.tokenizer, temporary.name)
    elif args.tokenizer is not None:
        _warn_on_vocabulary_gap(args.model, args.tokenizer)
    llm = LLM(model, load_format=args.load_format, dtype=args.dtype, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
              enforce_eager=args.enforce_eager, skip_tokenizer_init=True, seed=args.seed, tokenizer=args.tokenizer)
    json_object = StructuredOutputsParams(json_object=True)
    passes = {
        "unconstrained": [SamplingParams(temperature=workload.temperature, max_tokens=m, ignore_eos=True)
                          for m in workload.max_tokens],
        "json_object": [SamplingParams(temperature=workload.temperature, max_tokens=m, structured_outputs=json_object)
                        for m in workload.max_tokens],
    }
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    # Warm-up (kernels, and the json_object grammar's compile) on unrelated tokens.
    for params in passes.values():
        llm.generate([{"prompt_token_ids": [1 + i] * 100} for i in range(4)],
                     [SamplingParams(**{**{f: getattr(params[0], f) for f in params[0].__struct_fields__},
                                        "max_tokens": 16})] * 4, use_tqdm=False)
    result: dict = {"num_requests": len(prompts), "w1_output_tokens": workload.num_output_tokens}
    json_lengths: list[int] = []
    for name in (*passes, "unconstrained_same_lengths"):
        if name == "unconstrained_same_lengths":
            # W1 cut to the lengths the constrained pass produced (objects end early): the same batch shape over
            # time, so the difference is the grammar's cost alone, not fewer tokens per step in a longer tail.
            params = [SamplingParams(temperature=workload.temperature, max_tokens=max(1, n), ignore_eos=True)
                      for n in json_lengths]
        else:
            params = passes[name]
        runs = []
        for _ in range(args.runs):
            llm.engine.reset_prefix_cache()
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm)
            elapsed = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            runs.append({"elapsed_s": elapsed, "output_tokens": tokens, "output_tok_per_s": tokens / elapsed})
            if name == "json_object":
                runs[-1]["num_finished_objects"] = sum(o.outputs[0].finish_reason == "stop" for o in outputs)
                json_lengths = [len(o.outputs[0].token_ids) for o in outputs]
        result[name] = {"runs": runs, "median_output_tok_per_s": statistics.median(r["output_tok_per_s"]
                                                                                   for r in runs)}
    result["json_object_slowdown"] = 1 - (result["json_object"]["median_output_tok_per_s"]
                                          / result["unconstrained"]["median_output_tok_per_s"])
    same_lengths = result["unconstrained_same_lengths"]["median_output_tok_per_s"]
    result["json_object_slowdown_same_lengths"] = 1 - result["json_object"]["median_output_tok_per_s"] / same_lengths
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.structured_throughput", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory with a tokenizer (default: SmolLM2)")
    p.add_argument("--tokenizer", default=None,
                   help="the grammar's vocabulary, when the model directory has no tokenizer (a config-only one)")
    p.add_argument("--vocab-from-tokenizer", action="store_true",
                   help="dummy weights: the model takes the tokenizer's vocabulary size and EOS (see above)")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--grammar-switch-interval-us", type=float, default=None,
                   help="CPython switch interval while a grammar job is in flight (default: the engine's, "
                        "core.structured_output.manager.GRAMMAR_SWITCH_INTERVAL_S)")
    p.add_argument("--json", default=None, help="append the result (one JSON object per line) to this file")
    args = p.parse_args(argv)
    if args.vocab_from_tokenizer and (args.tokenizer is None or args.load_format != "dummy"):
        p.error("--vocab-from-tokenizer needs --tokenizer and --load-format dummy (it resizes the embedding)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    for name in ("unconstrained", "json_object", "unconstrained_same_lengths"):
        r = result[name]
        print(f"W1 {name:>26}: {r['median_output_tok_per_s']:.1f} out tok/s (median of {len(r['runs'])}; "
              f"{r['runs'][-1]['output_tokens']} of {result['w1_output_tokens']} W1 tokens)")
    print(f"json_object slowdown: {100 * result['json_object_slowdown']:.1f}% against W1, "
          f"{100 * result['json_object_slowdown_same_lengths']:.1f}% against W1 cut to the same output lengths",
          file=sys.stdout)
    append_json_line(args.json, {**result, "args": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
