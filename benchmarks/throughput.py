"""Offline throughput: the workloads W1-W4 of shared/BENCHMARKS.md through pagedserve's LLM (or HF generate).

Throughput = generated tokens / wall time from submitting the first request to the last one finishing; model load
and warm-up are excluded. Prints one table row per run and the median; ``--json`` appends the result to a file.

    python -m benchmarks.throughput --workload W1 --model ../shared/models/qwen3-0.6b --load-format dummy
    python -m benchmarks.throughput --workload W1 --model ../shared/models/qwen3-0.6b --load-format dummy \
        --kv-cache-dtype fp8      # e4m3 KV cache: twice the blocks of a bf16 one (reported as num_kv_blocks)

Quantized runs: ``--quantization fp8`` quantizes the (real or dummy) weights at load; ``--dummy-int4 awq`` (or
``gptq``) runs random int4 weights in that checkpoint layout: the model's config.json is copied into a temporary
directory with a ``quantization_config`` added, and ``--load-format dummy`` fills the packed tensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from benchmarks.json_lines import append_json_line

WORKLOADS = ("W1", "W2", "W3", "W4", "W5")


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: list[int]
    temperature: float

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)


def make_workload(name: str, num_prompts: int | None = None, seed: int = 0) -> Workload:
    """Requests drawn exactly as BENCHMARKS.md says, so every engine gets the same ones."""
    rng = np.random.default_rng(seed)
    if name in ("W1", "W2"):
        n = num_prompts or 256
        lens_in = rng.integers(100, 1025, size=n)
        lens_out = rng.integers(100, 1025, size=n)
        prompts = [rng.integers(0, 10000, size=int(k)).tolist() for k in lens_in]
        return Workload(name, prompts, [int(k) for k in lens_out], 0.6)
    if name == "W3":
        return Workload(name, [rng.integers(0, 10000, size=128).tolist()], [512], 0.0)
    if name == "W4":
        n = num_prompts or 256
        prefix = rng.integers(0, 10000, size=2048).tolist()
        prompts = [prefix + rng.integers(0, 10000, size=64).tolist() for _ in range(n)]
        return Workload(name, prompts, [128] * n, 0.0)
    if name == "W5":  # W5's requests offline (the serving run adds HTTP; max_num_seqs=256 stands for its concurrency)
        n = num_prompts or 1000
        return Workload(name, [rng.integers(0, 10000, size=512).tolist() for _ in range(n)], [128] * n, 0.0)
    raise ValueError(f"Unknown workload {name}; choose from {WORKLOADS}.")


def dummy_int4_model(model: str | None, method: str, group_size: int, directory: str) -> str:
    """A directory holding ``model``'s config.json with an AWQ (GEMM) or GPTQ (v1) ``quantization_config``: with
    ``--load-format dummy`` the engine builds random int4 weights in that layout (speed does not depend on values)."""
    from pathlib import Path

    from core.loader import load_hf_config
    from core.model_source import resolve_model

    config = load_hf_config(resolve_model(model))
    if method == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    else:
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": True,
              "checkpoint_format": "gptq"}
    config["quantization_config"] = qc
    config.setdefault("torch_dtype", "float16")
    path = Path(directory) / f"dummy-{method}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def run_pagedserve(args: argparse.Namespace, workload: Workload) -> list[dict]:
    import tempfile

    from frontend import LLM, SamplingParams

    model, load_format = args.model, args.load_format
    if args.dummy_int4:
        temporary = tempfile.TemporaryDirectory(prefix="pagedserve-int4-")
        model = dummy_int4_model(args.model, args.dummy_int4, args.dummy_group_size, temporary.name)
        load_format = "dummy"
    start = time.perf_counter()
    llm = LLM(
        model, load_format=load_format, dtype=args.dtype, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
        enable_pdl=not args.no_enable_pdl,
        enable_prefix_caching=not args.no_enable_prefix_caching, skip_tokenizer_init=True, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization, gguf_dequantize=args.gguf_dequantize,
    )
    startup = time.perf_counter() - start
    num_kv_blocks = llm.engine.get_stats()["num_kv_blocks"]
    print(f"startup to ready: {startup:.1f} s, {num_kv_blocks} KV blocks ({args.kv_cache_dtype} cache)",
          file=sys.stderr)
    params = [SamplingParams(temperature=workload.temperature, top_p=1.0, max_tokens=m, ignore_eos=True)
              for m in workload.max_tokens]
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    # Warm-up on unrelated tokens, so kernels are compiled and no prefix of the workload is cached.
    llm.generate([{"prompt_token_ids": [1 + i] * 200} for i in range(8)],
                 SamplingParams(temperature=workload.temperature, max_tokens=32, ignore_eos=True), use_tqdm=False)
    _report_triton_cache("after warm-up")
    results = []
    for run in range(args.runs):
        if not args.keep_prefix_cache:
            llm.engine.reset_prefix_cache()
        stats_before = llm.engine.get_stats()
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm)
        elapsed = time.perf_counter() - t0
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        assert generated == workload.num_output_tokens, (generated, workload.num_output_tokens)
        stats = llm.engine.get_stats()
        _report_triton_cache(f"after run {run}")
        results.append({
            "run": run, "elapsed_s": elapsed, "output_tokens": generated, "output_tok_per_s": generated / elapsed,
            "requests_per_s": len(prompts) / elapsed, "startup_s": startup,
            "preemptions": stats["total_preemptions"] - stats_before["total_preemptions"],
            "prefix_cache_hit_rate": _hit_rate(stats, stats_before), "num_kv_blocks": num_kv_blocks,
        })
    llm.engine.shutdown()  # its tensor-parallel workers and process group: a later LLM in this process starts its own
    return results


_seen_kernels: set[str] = set()


def _report_triton_cache(when: str) -> None:
    """With TRITON_CACHE_DIR set: which kernels were compiled since the last report (a compile inside a timed run
    costs that run up to a second per kernel)."""
    import os

    cache = os.environ.get("TRITON_CACHE_DIR")
    if not cache or not os.path.isdir(cache):
        return
    new = []
    for entry in sorted(set(os.listdir(cache)) - _seen_kernels):
        _seen_kernels.add(entry)
        names = [f[:-5] for f in os.listdir(os.path.join(cache, entry)) if f.endswith(".json") and
                 not f.startswith("__grp__")]
        new.extend(names)
    print(f"triton compiles {when}: {len(new)} {sorted(new) if len(new) < 12 else ''}", file=sys.stderr)


def _hit_rate(after: dict, before: dict) -> float | None:
    queries = after.get("prefix_cache_queries", 0) - before.get("prefix_cache_queries", 0)
    hits = after.get("prefix_cache_hits", 0) - before.get("prefix_cache_hits", 0)
    return hits / queries if queries else None


def run_hf(args: argparse.Namespace, workload: Workload) -> list[dict]:
    """The naive baseline: transformers ``generate`` in static batches, left-padded, EOS disabled."""
    import torch
    import transformers

    from core.loader import load_hf_config
    from core.model_source import resolve_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    source = resolve_model(args.model)
    start = time.perf_counter()
    if args.load_format == "dummy":
        config = transformers.AutoConfig.for_model(**load_hf_config(source))
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source.path, gguf_file=source.gguf_file, dtype=dtype).to(device)
    model.eval()
    model.generation_config.eos_token_id = None
    startup = time.perf_counter() - start
    results = []
    for run in range(args.runs):
        t0 = time.perf_counter()
        for i in range(0, len(workload.prompts), args.hf_batch_size):
            batch = workload.prompts[i : i + args.hf_batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            with torch.no_grad():
                model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max(workload.max_tokens[i : i + len(batch)]),
                    do_sample=workload.temperature > 0, temperature=workload.temperature or None, top_p=1.0,
                    top_k=None, pad_token_id=0, eos_token_id=None,
                )
        elapsed = time.perf_counter() - t0
        # Only the tokens each request asked for count: the rest of a static batch's tail is waste.
        generated = workload.num_output_tokens
        results.append({"run": run, "elapsed_s": elapsed, "output_tokens": generated,
                        "output_tok_per_s": generated / elapsed, "requests_per_s": len(batch) / elapsed,
                        "startup_s": startup})
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pagedserve bench throughput", description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=WORKLOADS, default="W1")
    p.add_argument("--model", default=None, help="model directory, .gguf file or HF id (default: SmolLM2)")
    p.add_argument("--backend", choices=("pagedserve", "hf"), default="pagedserve")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-enable-pdl", action="store_true", help="no programmatic dependent launch (kernels/pdl.py)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "fp8_e4m3"), default="auto",
                   help="KV-cache element type (pagedserve backend): fp8 = e4m3 with per-layer scales")
    p.add_argument("--quantization", choices=("fp8", "awq", "gptq", "gguf"), default=None,
                   help="weight quantization (fp8: quantize the weights at load; gguf: keep a GGUF file's blocks, "
                        "opt-in until measured on the GPU)")
    p.add_argument("--gguf-dequantize", action="store_true",
                   help="dequantize a GGUF file's weights at load (the path before GGUF kernels)")
    p.add_argument("--dummy-int4", choices=("awq", "gptq"), default=None,
                   help="random int4 weights in this checkpoint layout (implies --load-format dummy)")
    p.add_argument("--dummy-group-size", type=int, default=128)
    p.add_argument("--no-enable-prefix-caching", action="store_true")
    p.add_argument("--keep-prefix-cache", action="store_true",
                   help="keep the prefix cache between runs: a later run of the same prompts reuses their cached "
                        "blocks and skips most prefill (how a harness that does not reset the cache measures a "
                        "'warm' run); the hit rate is printed with each run")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--distributed-executor-backend", choices=("mp", "ray"), default="mp")
    p.add_argument("--num-prompts", type=int, default=None, help="override the workload's request count")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--json", default=None, help="append the result (one JSON object per line) to this file")
    args = p.parse_args(argv)
    if args.backend == "hf" and args.kv_cache_dtype != "auto":
        p.error(f"--kv-cache-dtype {args.kv_cache_dtype} applies to the pagedserve backend only")
    if args.keep_prefix_cache and (args.backend == "hf" or args.no_enable_prefix_caching):
        p.error("--keep-prefix-cache needs the pagedserve backend with prefix caching on")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    workload = make_workload(args.workload, args.num_prompts, args.seed)
    runner = run_pagedserve if args.backend == "pagedserve" else run_hf
    runs = runner(args, workload)
    median = statistics.median(r["output_tok_per_s"] for r in runs)
    print(f"{'run':>4} {'elapsed s':>10} {'out tokens':>11} {'out tok/s':>10} {'prefix hits':>11}")
    for r in runs:
        hits = r.get("prefix_cache_hit_rate")
        hits_text = "-" if hits is None else f"{hits:.1%}"
        print(f"{r['run']:>4} {r['elapsed_s']:>10.2f} {r['output_tokens']:>11} {r['output_tok_per_s']:>10.1f} "
              f"{hits_text:>11}")
    print(f"{args.workload} {args.backend} median output throughput: {median:.1f} tok/s "
          f"({len(workload.prompts)} requests, {workload.num_output_tokens} output tokens)")
    append_json_line(args.json, {"workload": args.workload, "backend": args.backend, "model": args.model,
                                 "median_output_tok_per_s": median, "runs": runs, "args": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
