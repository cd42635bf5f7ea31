"""Sliding-window block freeing (issue 11): a long-generation workload on a model whose every layer slides, run with
the out-of-window blocks freed during decode (``freeing``) and with them held until the sequence ends (``holding``,
the behaviour before; set here by turning the KV manager's window off after start-up), in the same KV budget.

The model is any Llama-style checkpoint directory turned into a Mistral with ``--sliding-window`` W (its config is
copied with ``sliding_window`` set; weights are dummy), e.g. Llama-3.1-8B with W = 1024. With long generations
and a KV cache smaller than the sequences' total length, holding preempts and recomputes; freeing keeps every
sequence to about W / block_size + 2 blocks (the defaults: 64 sequences of 1024 + 4096 tokens need 20,480 blocks of
16 when held, about 4,200 when freed, in a budget of 8,192). Reported per mode: out tok/s, the most KV blocks held
at once after the prefills, preemptions, and whether both modes produced the same greedy tokens (on CPU in fp32
they must; in bf16 a recompute after preemption runs in other batches, which may flip a near-tie).

    python -m benchmarks.sliding_window_bench --model ../shared/models/llama-3.1-8b --sliding-window 1024 \\
        --num-seqs 64 --input-len 1024 --output-len 4096 --num-gpu-blocks 8192
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.json_lines import append_json_line


def windowed_model(model: str, window: int, directory: Path) -> Path:
    """A copy of ``model``'s config.json as MistralForCausalLM with ``sliding_window`` = ``window`` (dummy weights)."""
    config = json.loads((Path(model) / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=window)
    config.pop("layer_types", None)
    config.pop("use_sliding_window", None)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def run_mode(args: argparse.Namespace, model: Path, prompts: list[list[int]], free_blocks: bool) -> dict:
    import torch

    from core.engine import EngineCore
    from ipc.messages import EngineConfig, EngineRequest, SamplingParams

    engine = EngineCore(EngineConfig(
        model=str(model), load_format="dummy", max_model_len=args.input_len + args.output_len,
        num_gpu_blocks_override=args.num_gpu_blocks, block_size=args.block_size, max_num_seqs=args.num_seqs,
        enforce_eager=args.enforce_eager, enable_prefix_caching=False, seed=0,
    ))
    window = engine.kv.sliding_window
    if window != args.sliding_window:
        raise SystemExit(f"The engine frees by window {window}, expected {args.sliding_window}.")
    if not free_blocks:
        engine.kv.sliding_window = 0  # the behaviour before: every block held until the sequence ends
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), prompt, params))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    most_held = steps = 0
    start = time.perf_counter()
    while engine.has_work():
        for out in engine.step().outputs:
            tokens[out.request_id].extend(out.new_token_ids)
        steps += 1
        if all(tokens.values()):  # every prompt computed: what decode holds
            most_held = max(most_held, engine.kv.pool.num_blocks - 1 - engine.kv.num_free_blocks)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    num_out = sum(len(t) for t in tokens.values())
    row = {
        "benchmark": "sliding_window_blocks", "mode": "freeing" if free_blocks else "holding",
        "model": args.model, "sliding_window": window, "num_seqs": len(prompts), "input_len": args.input_len,
        "output_len": args.output_len, "num_gpu_blocks": engine.kv.pool.num_blocks, "block_size": args.block_size,
        "elapsed_s": round(elapsed, 3), "out_tok_per_s": round(num_out / elapsed, 1), "steps": steps,
        "most_blocks_held_decoding": most_held, "preemptions": engine.scheduler.total_preemptions,
    }
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row | {"tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a checkpoint directory with a Llama-style config.json")
    p.add_argument("--sliding-window", type=int, default=1024)
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=4096)
    p.add_argument("--num-gpu-blocks", type=int, default=8192, help="the KV budget both modes get")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["freeing", "holding"], choices=["freeing", "holding"])
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--json", default=None, help="Append one JSON object per mode to this file.")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    vocab = json.loads((Path(args.model) / "config.json").read_text()).get("vocab_size", 10000)
    prompts = [rng.integers(0, min(10000, vocab), size=args.input_len).tolist() for _ in range(args.num_seqs)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = windowed_model(args.model, args.sliding_window, Path(tmp) / "windowed")
        for mode in args.modes:
            rows.append(run_mode(args, model, prompts, free_blocks=mode == "freeing"))
    same = len(rows) == 2 and rows[0]["tokens"] == rows[1]["tokens"]
    for row in rows:
        row.pop("tokens")
        row["same_tokens_across_modes"] = same if len(rows) == 2 else None
        print(f"{row['mode']:>8}: {row['out_tok_per_s']:>10.1f} out tok/s  {row['elapsed_s']:8.2f} s  "
              f"most blocks held {row['most_blocks_held_decoding']:>6} of {row['num_gpu_blocks'] - 1}  "
              f"preemptions {row['preemptions']}")
        append_json_line(args.json, row)
    if len(rows) == 2:
        print(f"freeing / holding: {rows[0]['out_tok_per_s'] / rows[1]['out_tok_per_s']:.2f}x; "
              f"same greedy tokens: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
