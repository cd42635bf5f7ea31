"""``pagedserve bench serve``: load-test any OpenAI-compatible server (ours, vLLM, others) over streaming HTTP.

Takes the flags of ``vllm bench serve`` so the same command line measures both, e.g. W5:

    pagedserve bench serve --backend vllm --endpoint /v1/completions --dataset-name random \\
        --random-input-len 512 --random-output-len 128 --num-prompts 1000 --max-concurrency 256 --ignore-eos --seed 0

Prints the result table, and with ``--save-result`` writes a JSON file plus two PNG plots beside it
(latency CDFs; output tokens/s and requests in flight over time). Exit status: 0 when every request succeeded,
1 when any failed (the failures and their reasons are still reported), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks import datasets
from benchmarks.openai_client import RequestOutput, RequestSpec, fetch_models, send_request, wait_until_up
from benchmarks.serve_metrics import LATENCY_METRICS, BenchmarkMetrics, compute_metrics, format_table

BACKENDS = {"vllm": False, "openai": False, "openai-chat": True}  # backend -> speaks the chat protocol
_DEFAULT_ENDPOINT = {False: "/v1/completions", True: "/v1/chat/completions"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pagedserve bench serve",
        description="Benchmark an OpenAI-compatible server with streaming requests (flags of `vllm bench serve`).",
    )
    server = p.add_argument_group("server")
    server.add_argument("--backend", choices=sorted(BACKENDS), default="openai",
                        help="vllm/openai: /v1/completions; openai-chat: /v1/chat/completions.")
    server.add_argument("--base-url", default=None, help="Server URL, e.g. http://127.0.0.1:8000 (wins over host/port).")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--endpoint", default=None, help="API path; default from --backend.")
    server.add_argument("--model", default=None,
                        help="Model name sent to the server and tokenizer source; default: the server's first model.")
    server.add_argument("--served-model-name", default=None, help="Name to send in requests, if not --model.")
    server.add_argument("--tokenizer", default=None, help="Tokenizer name or path (default: --model).")
    server.add_argument("--trust-remote-code", action="store_true")
    server.add_argument("--api-key", default=None, help="Bearer token (default: $OPENAI_API_KEY if set).")
    server.add_argument("--header", nargs="*", default=[], metavar="KEY=VALUE", help="Extra HTTP headers.")
    server.add_argument("--ready-check-timeout-sec", type=float, default=600,
                        help="Wait this long for the server to answer before giving up.")

    data = p.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=["random", "prefix_repetition", "custom"], default="random")
    data.add_argument("--dataset-path", default=None, help="JSONL for --dataset-name custom.")
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="Lengths uniform in [len*(1-r), len*(1+r)]; 0 gives exact lengths.")
    data.add_argument("--random-prefix-len", type=int, default=0, help="Shared random prefix before each prompt.")
    data.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    data.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    data.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    data.add_argument("--prefix-repetition-output-len", type=int, default=128)
    data.add_argument("--custom-output-len", type=int, default=256,
                      help="max_tokens for custom lines without 'output_tokens'.")
    data.add_argument("--skip-chat-template", action="store_true",
                      help="Send custom prompts raw to /v1/completions instead of through the chat template.")
    data.add_argument("--disable-shuffle", action="store_true")

    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="Requests per second (Poisson/gamma arrivals); inf sends all at once.")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="Gamma shape of inter-arrival times: 1 is Poisson, <1 burstier, >1 more regular.")
    load.add_argument("--max-concurrency", type=int, default=None, help="At most this many requests in flight.")
    load.add_argument("--duration", type=float, default=None,
                      help="Stop after this many seconds: no new requests, unfinished ones cancelled.")
    load.add_argument("--num-warmups", type=int, default=0, help="Untimed requests sent before the run.")

    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--ignore-eos", action="store_true",
                          help="Send ignore_eos so every request generates exactly its max_tokens.")
    sampling.add_argument("--temperature", type=float, default=None, help="Default 0 (greedy), as vLLM.")
    sampling.add_argument("--top-p", type=float, default=None)
    sampling.add_argument("--top-k", type=int, default=None)
    sampling.add_argument("--min-p", type=float, default=None)
    sampling.add_argument("--extra-body", type=json.loads, default=None, help="JSON object merged into each body.")

    results = p.add_argument_group("results")
    results.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                         help="Which latencies get a table section: any of ttft,tpot,itl,e2el.")
    results.add_argument("--metric-percentiles", default="50,90,99", help="Percentiles to report, e.g. 50,90,99.")
    results.add_argument("--save-result", action="store_true", help="Write a JSON result file and PNG plots.")
    results.add_argument("--save-detailed", action="store_true", help="Also keep per-request data in the JSON.")
    results.add_argument("--result-dir", default=".")
    results.add_argument("--result-filename", default=None)
    results.add_argument("--label", default=None, help="Name of this run in the file name (default: backend).")
    results.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE", help="Recorded in the JSON.")
    results.add_argument("--no-plots", action="store_true", help="With --save-result, skip the PNG plots.")
    results.add_argument("--disable-tqdm", action="store_true")
    return p


@dataclass
class RunResult:
    outputs: list[RequestOutput]
    t0: float
    duration: float
    model: str


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_args(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        return _run_with_best_loop(_main_async(args))
    except (ConnectionError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _check_args(args: argparse.Namespace) -> None:
    chat = BACKENDS[args.backend]
    args.endpoint = args.endpoint or _DEFAULT_ENDPOINT[chat]
    if chat != args.endpoint.rstrip("/").endswith("chat/completions"):
        raise ValueError(f"--backend {args.backend} does not speak to --endpoint {args.endpoint}: "
                         "use --backend openai-chat for /v1/chat/completions, vllm/openai for /v1/completions")
    if args.request_rate <= 0 or args.burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise ValueError("--duration must be positive")
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    if args.dataset_name == "custom" and not args.dataset_path:
        raise ValueError("--dataset-name custom needs --dataset-path")
    args.selected_metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    unknown = set(args.selected_metrics) - set(LATENCY_METRICS)
    if unknown:
        raise ValueError(f"--percentile-metrics: unknown {sorted(unknown)}; choose from {list(LATENCY_METRICS)}")
    args.percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    if any(not 0 <= p <= 100 for p in args.percentiles):
        raise ValueError("--metric-percentiles must be within [0, 100]")
    args.headers = _key_values(args.header, "--header")
    args.metadata_dict = _key_values(args.metadata, "--metadata")


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def _run_with_best_loop(coro) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def _main_async(args: argparse.Namespace) -> int:
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    api_url = base_url + args.endpoint
    headers = dict(args.headers)
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0, keepalive_timeout=60, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        await wait_until_up(session, base_url, headers, args.ready_check_timeout_sec)
        model = args.served_model_name or args.model
        if model is None:
            models = await fetch_models(session, base_url, headers)
            if not models:
                raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
            model = models[0]
        tokenizer = load_tokenizer(args.tokenizer or args.model or model, args.trust_remote_code)
        requests = build_requests(args, tokenizer)
        _print_intro(args, api_url, model, requests)
        result = await run_load(session, args, api_url, model, headers, requests)
    metrics = compute_metrics(result.outputs, result.duration, tokenizer.count, args.percentiles, args.ignore_eos)
    print(format_table(metrics, vars(args), args.selected_metrics))
    _print_notes(metrics, args)
    if args.save_result:
        save_results(args, metrics, result, base_url)
    return 0 if metrics.failed == 0 and metrics.completed > 0 else 1


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str | None, trust_remote_code: bool = False) -> datasets.BenchTokenizer:
    """The model's tokenizer, found the way the server finds it (local dir, .gguf, HF cache); None: the default model.

    Cached: loading one from a GGUF file takes seconds, and repeated runs in one process reuse it.
    """
    from core.model_source import resolve_model

    try:
        from core.tokenizer import load_tokenizer as load_model_tokenizer
    except ImportError:
        load_model_tokenizer = None
    try:
        source = resolve_model(name)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"cannot find a tokenizer for {name!r} ({e}); pass --tokenizer PATH") from None
    if load_model_tokenizer is not None:
        return datasets.BenchTokenizer(load_model_tokenizer(source))
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    return datasets.BenchTokenizer(AutoTokenizer.from_pretrained(source.path, **kwargs))


def build_requests(args: argparse.Namespace, tokenizer: datasets.BenchTokenizer) -> list[datasets.SampleRequest]:
    if args.dataset_name == "random":
        return datasets.random_requests(
            tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
            range_ratio=args.random_range_ratio, prefix_len=args.random_prefix_len, seed=args.seed)
    if args.dataset_name == "prefix_repetition":
        return datasets.prefix_repetition_requests(
            tokenizer, args.num_prompts, args.prefix_repetition_prefix_len, args.prefix_repetition_suffix_len,
            args.prefix_repetition_num_prefixes, args.prefix_repetition_output_len, seed=args.seed,
            shuffle=not args.disable_shuffle)
    return datasets.custom_requests(
        tokenizer, args.dataset_path, args.num_prompts, args.custom_output_len, chat=BACKENDS[args.backend],
        apply_chat_template=not args.skip_chat_template, seed=args.seed, shuffle=not args.disable_shuffle)


def arrival_offsets(n: int, request_rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send time of each request, in seconds after the first: gamma(shape=burstiness) gaps with mean 1/rate.

    As vLLM does, the gaps are rescaled so the last request goes out at exactly n / rate: runs with different seeds
    then offer the same average load.
    """
    if request_rate == float("inf"):
        return np.zeros(n)
    if burstiness == float("inf"):
        gaps = np.full(n, 1.0 / request_rate)
    else:
        gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    offsets = np.cumsum(gaps)
    return offsets * (n / request_rate / offsets[-1]) if offsets[-1] > 0 else offsets


def _spec(
    args: argparse.Namespace, api_url: str, model: str, headers: dict[str, str], request: datasets.SampleRequest
) -> RequestSpec:
    sampling: dict[str, Any] = {"temperature": 0.0 if args.temperature is None else args.temperature}
    for key in ("top_p", "top_k", "min_p"):
        if getattr(args, key) is not None:
            sampling[key] = getattr(args, key)
    return RequestSpec(
        api_url=api_url, model=model, chat=BACKENDS[args.backend], prompt=request.prompt, messages=request.messages,
        prompt_len=request.prompt_len, max_tokens=request.expected_output_len, ignore_eos=args.ignore_eos,
        sampling=sampling, headers=headers, extra_body=args.extra_body)


async def run_load(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    api_url: str,
    model: str,
    headers: dict[str, str],
    requests: list[datasets.SampleRequest],
) -> RunResult:
    """Send the requests on their arrival schedule under the concurrency cap, within the duration bound."""
    specs = [_spec(args, api_url, model, headers, r) for r in requests]

    if args.num_warmups > 0:
        warm = [RequestOutput(specs[0].prompt_len, specs[0].max_tokens) for _ in range(args.num_warmups)]
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else nullcontext()

        async def warm_one(out: RequestOutput) -> None:
            async with limit:
                await send_request(session, specs[0], out)

        await asyncio.gather(*(warm_one(w) for w in warm))
        print(f"Warm-up: {sum(w.success for w in warm)}/{len(warm)} succeeded.")

    outputs = [RequestOutput(r.prompt_len, r.expected_output_len) for r in requests]
    offsets = arrival_offsets(len(requests), args.request_rate, args.burstiness, args.seed)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else nullcontext()
    progress = None
    if not args.disable_tqdm:
        from tqdm import tqdm

        progress = tqdm(total=len(requests), desc="requests", unit="req", dynamic_ncols=True)

    async def one(i: int) -> None:
        async with limit:
            await send_request(session, specs[i], outputs[i])
        if progress is not None:
            progress.update(1)

    gc.collect()
    gc.freeze()  # the many long-lived request objects would otherwise be rescanned during the run
    t0 = time.perf_counter()
    deadline = t0 + args.duration if args.duration else float("inf")
    tasks: list[asyncio.Task] = []
    try:
        for i, offset in enumerate(offsets.tolist()):
            wait = min(t0 + offset, deadline) - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(one(i)))
        remaining = deadline - time.perf_counter()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=None if remaining == float("inf") else max(remaining, 0))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        end = min(time.perf_counter(), deadline)
        gc.unfreeze()
        if progress is not None:
            progress.close()
    return RunResult(outputs=outputs, t0=t0, duration=end - t0, model=model)


def _print_intro(args: argparse.Namespace, api_url: str, model: str, requests: list[datasets.SampleRequest]) -> None:
    lens_in = [r.prompt_len for r in requests]
    lens_out = [r.expected_output_len for r in requests]
    print(f"Target: {api_url}  model: {model}")
    print(f"Dataset: {args.dataset_name}, {len(requests)} requests, prompt tokens {min(lens_in)}-{max(lens_in)}, "
          f"max_tokens {min(lens_out)}-{max(lens_out)}, seed {args.seed}")
    rate = "inf" if args.request_rate == float("inf") else f"{args.request_rate:g} req/s"
    kind = "Poisson" if args.burstiness == 1.0 else f"gamma, burstiness {args.burstiness:g}"
    print(f"Traffic: rate {rate} ({kind}), max concurrency {args.max_concurrency}, duration limit {args.duration}")


def _print_notes(metrics: BenchmarkMetrics, args: argparse.Namespace) -> None:
    if metrics.output_len_mismatches:
        print(f"Note: {metrics.output_len_mismatches} request(s) returned a number of output tokens other than "
              "their max_tokens despite --ignore-eos: the server may not honour ignore_eos.")
    if metrics.prompt_len_mismatches:
        print(f"Note: on {metrics.prompt_len_mismatches} request(s) the server counted a different number of "
              "prompt tokens than the benchmark's tokenizer: check --tokenizer (and, for chat, the template).")
    if metrics.output_tokens_source == "tokenizer":
        print("Note: the server sent no usage; output tokens were counted by re-tokenizing the text.")


def default_result_name(args: argparse.Namespace, model: str) -> str:
    """vLLM's naming: {label}-{rate}qps[-concurrency{n}]-{model}-{YYYYmmdd-HHMMSS}.json"""
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{args.label or args.backend}-{args.request_rate}qps{concurrency}-{model.split('/')[-1]}-{stamp}.json"


def save_results(args: argparse.Namespace, metrics: BenchmarkMetrics, result: RunResult, base_url: str) -> Path:
    out_dir = Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (args.result_filename or default_result_name(args, result.model))
    data: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": args.backend,
        "label": args.label,
        "base_url": base_url,
        "endpoint": args.endpoint,
        "model_id": result.model,
        "tokenizer_id": args.tokenizer or args.model or result.model,
        "dataset_name": args.dataset_name,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate if np.isfinite(args.request_rate) else "inf",
        "burstiness": args.burstiness if np.isfinite(args.burstiness) else "inf",
        "max_concurrency": args.max_concurrency,
        "duration_limit": args.duration,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        **args.metadata_dict,
        **metrics.flat(),
    }
    if args.save_detailed:
        data.update(metrics.per_request)
    if not args.no_plots:
        from benchmarks.plots import plot_latency_cdfs, plot_throughput

        title = f"{result.model} @ {base_url}: {metrics.completed} requests, concurrency {args.max_concurrency}"
        output_lens = metrics.per_request["output_lens"]
        stem = path.with_suffix("")
        cdf = plot_latency_cdfs(result.outputs, output_lens, Path(f"{stem}_latency_cdf.png"), title)
        tput = plot_throughput(result.outputs, output_lens, result.t0, result.duration,
                               Path(f"{stem}_throughput.png"), title)
        data["plots"] = [str(cdf), str(tput)]
    path.write_text(json.dumps(data, indent=2, allow_nan=False))
    print(f"Results saved to {path}" + (f" (plots: {', '.join(data['plots'])})" if "plots" in data else ""))
    return path


if __name__ == "__main__":
    sys.exit(main())
