"""W8: embeddings throughput of all-MiniLM-L6-v2 on 10,000 sentences of 16-256 tokens.

Three runs on the same sentences: pagedserve offline (``LLM.embed``), pagedserve through ``/v1/embeddings`` (one
sentence per request, ``--concurrency`` in flight; the server is started here unless ``--base-url`` is given), and
sentence-transformers' ``encode`` (``--st-batch-size``, default 256) on the same device. Embeddings/s counts from the
first sentence submitted (tokenization included, as ``encode`` includes it) to the last embedding back; model load
and a warm-up pass are excluded. The first run's embeddings are checked against sentence-transformers' (cosine).

    python -m benchmarks.embed_bench --runs offline,serve,st --json benchmarks/results/w8.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks.json_lines import append_json_line

MODEL = "all-MiniLM-L6-v2"
# Common words that MiniLM's WordPiece vocabulary holds whole: a sentence of n words is n + 2 tokens.
WORDS = ("the of and to in is was for on are with as by at from this that have not but all can had were an when "
         "there which their one will would each about how up out them then many some so these time two may first "
         "water been call who oil now find long down day did get come made part over new sound take only little "
         "work know place year live back give most very after thing our just name good sentence man think say "
         "great where help through much before line right too mean old any same tell boy follow came want show "
         "also around form three small set put end does another well large must big even such because turn here "
         "why ask went men read need land different home us move try kind hand picture again change off play "
         "spell air away animal house point page letter mother answer found study still learn should world").split()


def make_sentences(num: int, seed: int = 0, min_tokens: int = 16, max_tokens: int = 256) -> list[str]:
    """``num`` sentences whose token counts are uniform in [min_tokens, max_tokens] ([CLS] and [SEP] included)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_tokens, max_tokens + 1, size=num)
    words = np.array(WORDS)
    return [" ".join(words[rng.integers(0, len(words), size=n - 2)]) for n in lengths]


def run_offline(model: str, sentences: list[str], args) -> tuple[float, np.ndarray]:
    from frontend.llm import LLM

    llm = LLM(model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    llm.embed(sentences[: min(len(sentences), 512)], use_tqdm=False)  # warm-up: kernels compiled for the shapes
    start = time.perf_counter()
    outs = llm.embed(sentences, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, np.array([o.outputs.embedding for o in outs], dtype=np.float32)


async def _post_all(base_url: str, sentences: list[str], concurrency: int) -> list[list[float]]:
    import aiohttp

    results: list[list[float] | None] = [None] * len(sentences)
    queue = iter(range(len(sentences)))

    async def worker(session) -> None:
        for i in queue:
            async with session.post(f"{base_url}/v1/embeddings", json={"model": MODEL, "input": sentences[i]}) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {body}")
                results[i] = body["data"][0]["embedding"]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return results


def run_serve(model: str, sentences: list[str], args) -> tuple[float, np.ndarray]:
    server = None
    base_url = args.base_url
    if base_url is None:
        import socket

        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "frontend.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
               "--disable-uvicorn-access-log", "--served-model-name", MODEL, "--device", args.device, "--dtype", args.dtype,
               "--max-num-seqs", str(args.max_num_seqs)]
        if args.max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=dict(os.environ, PAGEDSERVE_LOG_LEVEL="WARNING"))
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    try:
        asyncio.run(_post_all(base_url, sentences[: min(len(sentences), 512)], args.concurrency))  # warm-up
        start = time.perf_counter()
        vectors = asyncio.run(_post_all(base_url, sentences, args.concurrency))
        elapsed = time.perf_counter() - start
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    return elapsed, np.array(vectors, dtype=np.float32)


def run_sentence_transformers(model: str, sentences: list[str], args) -> tuple[float, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    from core.model_source import resolve_model

    device = args.device if args.device != "auto" else ("cuda" if _cuda() else "cpu")
    st = SentenceTransformer(resolve_model(model).path, device=device)
    if args.dtype in ("float16", "half"):
        st = st.half()
    elif args.dtype in ("bfloat16", "bf16"):
        st = st.bfloat16()
    st.encode(sentences[: min(len(sentences), 512)], batch_size=args.st_batch_size)
    start = time.perf_counter()
    vectors = st.encode(sentences, batch_size=args.st_batch_size, convert_to_numpy=True)
    _sync()
    return time.perf_counter() - start, np.asarray(vectors, dtype=np.float32)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


RUNNERS = {"offline": run_offline, "serve": run_serve, "st": run_sentence_transformers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--runs", default="offline,serve,st", help="comma-separated: offline, serve, st")
    parser.add_argument("--num-sentences", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--st-batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--base-url", default=None, help="an already running server (else one is started)")
    parser.add_argument("--json", default=None, help="append one JSON line per run to this file")
    args = parser.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNNERS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {sorted(RUNNERS)}")
    sentences = make_sentences(args.num_sentences)
    results, first = [], None
    print(f"W8: {len(sentences)} sentences, {args.model}")
    print(f"{'run':10s} {'seconds':>9s} {'embeddings/s':>13s} {'min cosine vs first':>20s}")
    for name in runs:
        elapsed, vectors = RUNNERS[name](args.model, sentences, args)
        if first is None:
            first = vectors
        cos = float(((vectors * first).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(first, axis=1)).min())
        row = {"workload": "W8", "run": name, "model": args.model, "num_sentences": len(sentences),
               "seconds": elapsed, "embeddings_per_s": len(sentences) / elapsed, "min_cosine_vs_first": cos,
               "concurrency": args.concurrency if name == "serve" else None,
               "batch_size": args.st_batch_size if name == "st" else None, "device": args.device, "dtype": args.dtype}
        results.append(row)
        print(f"{name:10s} {elapsed:9.2f} {row['embeddings_per_s']:13.1f} {cos:20.6f}", flush=True)
        append_json_line(args.json, row)
    by_run = {r["run"]: r["embeddings_per_s"] for r in results}
    if "offline" in by_run and "st" in by_run:
        print(f"offline / sentence-transformers: {by_run['offline'] / by_run['st']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
