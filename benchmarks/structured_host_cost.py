"""Where structured outputs spend engine time: the same requests unconstrained and under ``json_object``, through
an in-process EngineCore, with the engine thread's time in the grammar work per step: ``prepare_s`` (hand the previous tokens and this step's
rows to the grammar threads), ``mask_fill_s`` (wait for / fill the masks, upload), ``accept_s`` (matchers advanced on
the engine thread), ``mask_apply_s`` (the mask op; on CUDA only its launch).

    python -m benchmarks.structured_host_cost --model .models/smollm2-135m --load-format dummy --num-requests 256

On CPU (``--device cpu``, a tiny model) it measures the host side alone: greedy by default, so the CPU sampler's
noise does not drown the grammar's cost. ``--per-sequence`` uses one xgrammar call per sequence instead of the
batched calls (the old path), for a before/after on the same build.

``--components 64,256`` runs no model: the per-step grammar cost at those row counts with the model's tokenizer, split
into raw accept, raw fill, engine-thread glue, the overlap (when the grammar job started; how long ``bitmask`` waited)
and the mask's upload and apply (``component_costs``):

    python -m benchmarks.structured_host_cost --model .models/smollm2-135m --components 64,256 --device cuda
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import time
from pathlib import Path

from benchmarks.json_lines import append_json_line
from benchmarks.profile_step import _timed


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
    engine.structured.bitmask = _timed(totals, "mask_fill_s", engine.structured.bitmask, count_calls=True)
    engine.structured.accept = _timed(totals, "accept_s", engine.structured.accept, count_calls=True)
    if hasattr(engine.structured, "prepare"):  # absent before the grammar threads: lets it time an older build
        engine.structured.prepare = _timed(totals, "prepare_s", engine.structured.prepare, count_calls=True)
    core.sampler.apply_token_bitmask = _timed(totals, "mask_apply_s", core.sampler.apply_token_bitmask,
                                              count_calls=True)
    if hasattr(engine, "_start_grammar_job_early"):  # absent in older builds
        start_early = engine._start_grammar_job_early

        def counting_start_early(*args):
            started = start_early(*args)
            totals["early_starts"] += started
            return started

        engine._start_grammar_job_early = counting_start_early
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
                        **{k: (v if k.endswith(("_calls", "_starts")) else 1e3 * v / steps) for k, v in totals.items()}}
    result["json_object_slowdown"] = 1 - (result["json_object"]["output_tok_per_s"]
                                          / result["unconstrained"]["output_tok_per_s"])
    engine.shutdown()
    return result


# ------------------------------------------------------------------------------------------------ components
class _StandInSequence:
    """What ``StructuredOutputManager`` reads of a sequence."""

    def __init__(self, key: tuple[str, int], sampling_params) -> None:
        self.key = key
        self.sampling_params = sampling_params
        self.output_token_ids: list[int] = []


def _allowed_tokens(bitmask, vocab_size: int):
    """[rows, V] bool from an xgrammar bitmask (a byte table: no loop over tokens)."""
    import torch

    table = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()
    return table[bitmask.contiguous().view(torch.uint8).long()].view(bitmask.shape[0], -1)[:, :vocab_size]


def _busy_python(seconds: float) -> None:
    """Pure-Python work holding the GIL, like the engine's per-step bookkeeping."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def component_costs(args: argparse.Namespace, num_rows: int) -> dict:
    """Host ms per step for ``num_rows`` rows under json_object, with the model's tokenizer and no model: raw
    xgrammar accept and fill (one thread, thread CPU time), the mask's upload and apply, and through
    ``StructuredOutputManager`` (the engine's path): engine-thread CPU time in ``prepare`` + ``bitmask`` (the glue;
    includes the work itself when it runs inline) and the wall time ``bitmask`` waits while the engine thread did
    ``--engine-busy-ms`` of pure Python after ``prepare`` (the overlap: ~0 when the grammar job hides behind it), and
    when the grammar thread started the job, counted from ``prepare`` (it must not wait for the engine to block).

    Every row samples a uniformly random allowed token each step (a matcher that ends its object starts over), so
    the rows spread over the grammar's states as a random model's do."""
    import statistics

    import torch
    import xgrammar as xgr

    from core.model_source import resolve_model
    from core.structured_output.bitmask import apply_token_bitmask
    from core.structured_output.manager import StructuredOutputManager
    from core.structured_output.tokenizer_info import load_tokenizer_info
    from ipc.messages import SamplingParams, StructuredOutputsParams

    source = resolve_model(args.model)
    config_path = Path(source.path) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    vocab_size = int(config.get("vocab_size", 49152))
    eos = config.get("eos_token_id", 2)
    eos_ids = eos if isinstance(eos, list) else [eos]
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    manager = StructuredOutputManager(lambda: load_tokenizer_info(source, None, vocab_size, eos_ids), vocab_size,
                                      num_rows, grammar_threads=args.num_grammar_threads)
    if args.grammar_threads is not None:
        manager.overlap = args.grammar_threads == "on"
    params = SamplingParams(max_tokens=1 << 20, structured_outputs=StructuredOutputsParams(json_object=True))
    seqs = [_StandInSequence((f"row-{i}", 0), params) for i in range(num_rows)]
    for seq in seqs:
        manager.add(seq)
    while any(manager.holds(seq) for seq in seqs):
        manager.wait_for_compile(0.05)
    matchers = [manager._matchers[seq.key] for seq in seqs]
    job_starts: list[float] = []
    accept_and_fill = manager._accept_and_fill

    def timed_job(*job_args):  # when the grammar thread got to run the step's job
        job_starts.append(time.perf_counter())
        return accept_and_fill(*job_args)

    manager._accept_and_fill = timed_job
    generator = torch.Generator().manual_seed(0)
    filler = xgr.BatchGrammarMatcher(max_threads=1)
    raw_mask = torch.empty(num_rows, -(-vocab_size // 32), dtype=torch.int32)
    logits = torch.zeros(num_rows, vocab_size, device=device)

    def sample(mask) -> list[int]:
        return torch.multinomial(_allowed_tokens(mask, vocab_size).float(), 1, generator=generator)[:, 0].tolist()

    ended = getattr(manager, "_ended", set())  # the manager's record of ended grammars (absent in older builds)

    def restart_ended(mask) -> None:
        for i, matcher in enumerate(matchers):
            if matcher.is_terminated():
                matcher.reset()
                ended.discard(seqs[i].key)
                matcher.fill_next_token_bitmask(mask, i)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    accept_ms, fill_ms, copy_ms, apply_ms, glue_ms, wait_ms, start_ms = [], [], [], [], [], [], []
    started_while_busy: list[bool] = []
    _, mask = manager.bitmask(seqs, torch.device("cpu"))
    mask = mask.clone()
    restart_ended(mask)
    for step in range(args.warmup_steps + args.steps):
        record = step >= args.warmup_steps
        tokens = sample(mask)
        # Raw xgrammar, one thread, on the same matchers (advanced, then rolled back for the manager's pass).
        t0 = time.thread_time()
        ok = xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)
        t1 = time.thread_time()
        live = [i for i, matcher in enumerate(matchers) if not matcher.is_terminated()]
        t1b = time.thread_time()
        filler.batch_fill_next_token_bitmask([matchers[i] for i in live], raw_mask, live)
        t2 = time.thread_time()
        if not all(ok):
            raise RuntimeError("a sampled token was rejected: the benchmark's masks are wrong")
        xgr.BatchGrammarMatcher.batch_rollback(matchers, 1)
        # The engine's path: prepare (hand off), the engine's own Python meanwhile, bitmask (join, upload).
        job_starts.clear()
        c0, w0 = time.thread_time(), time.perf_counter()
        manager.prepare(seqs, tokens, seqs)
        c1 = time.thread_time()
        _busy_python(args.engine_busy_ms / 1e3)
        c2, w2 = time.thread_time(), time.perf_counter()
        rows, device_mask = manager.bitmask(seqs, device)
        c3, w3 = time.thread_time(), time.perf_counter()
        sync()
        w4 = time.perf_counter()
        if device.type == "cuda":  # the CPU reference's cost says nothing about the device kernel
            apply_token_bitmask(logits, rows, device_mask)
            sync()
        w5 = time.perf_counter()
        mask = device_mask.cpu().clone()
        if not torch.equal(mask[live], raw_mask[live]):
            raise RuntimeError("the manager's mask differs from xgrammar's own fill")
        restart_ended(mask)
        if record:
            accept_ms.append(1e3 * (t1 - t0))
            fill_ms.append(1e3 * (t2 - t1b))
            glue_ms.append(1e3 * ((c1 - c0) + (c3 - c2)))
            wait_ms.append(1e3 * (w3 - w2))
            if job_starts and manager.overlap:  # inline (no grammar thread), the job is bitmask's own work
                start_ms.append(1e3 * (job_starts[0] - w0))
                started_while_busy.append(job_starts[0] < w2)
            copy_ms.append(1e3 * (w4 - w3))
            apply_ms.append(1e3 * (w5 - w4) if device.type == "cuda" else float("nan"))
    manager.shutdown()
    median = statistics.median
    return {"rows": num_rows, "device": device.type, "grammar_threads_on": manager.overlap,
            "num_grammar_threads": manager._num_threads, "engine_busy_ms": args.engine_busy_ms,
            "raw_accept_ms": median(accept_ms), "raw_fill_ms": median(fill_ms),
            "engine_thread_cpu_ms": median(glue_ms), "bitmask_wait_ms": median(wait_ms),
            "job_start_ms": median(start_ms) if start_ms else float("nan"),
            # Share of steps whose grammar job started before the engine thread's Python work ended: the overlap
            # itself, robust to a loaded machine stretching every wall time.
            "job_started_while_busy": (sum(started_while_busy) / len(started_while_busy) if started_while_busy
                                       else float("nan")),
            "upload_wait_ms": median(copy_ms), "apply_ms": median(apply_ms)}


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
    p.add_argument("--components", default=None, metavar="ROWS,...",
                   help="no engine: per-step grammar host cost at these row counts (e.g. 64,256) with the model's "
                        "tokenizer, split into raw accept, raw fill, engine-thread glue, overlap wait, upload, apply")
    p.add_argument("--steps", type=int, default=30, help="--components: measured steps")
    p.add_argument("--warmup-steps", type=int, default=5, help="--components: unmeasured steps first")
    p.add_argument("--engine-busy-ms", type=float, default=3.0,
                   help="--components: pure-Python work the engine thread does between prepare and bitmask")
    p.add_argument("--num-grammar-threads", type=int, default=None, help="xgrammar fill threads (default: auto)")
    p.add_argument("--json", default=None, help="append the result (one JSON object per line) to this file")
    args = p.parse_args(argv)
    if args.components:
        print("rows  raw accept  raw fill(1 thr)  engine-thread CPU  job start  started in busy  bitmask wait  upload  "
              "apply   (ms per step, "
              f"engine busy {args.engine_busy_ms} ms)")
        for rows in (int(r) for r in args.components.split(",")):
            r = component_costs(args, rows)
            print(f"{rows:>4}  {r['raw_accept_ms']:>10.3f}  {r['raw_fill_ms']:>15.3f}"
                  f"  {r['engine_thread_cpu_ms']:>17.3f}"
                  f"  {r['job_start_ms']:>9.3f}  {100 * r['job_started_while_busy']:>14.0f}%"
                  f"  {r['bitmask_wait_ms']:>12.3f}  {r['upload_wait_ms']:>6.3f}  {r['apply_ms']:>5.3f}"
                  f"   ({r['device']}, grammar thread {'on' if r['grammar_threads_on'] else 'off'}, "
                  f"{r['num_grammar_threads']} fill threads)")
            append_json_line(args.json, {"components": r, "args": vars(args)})
        return 0
    result = run(args)
    for name in ("unconstrained", "json_object"):
        r = result[name]
        grammar = "  ".join(f"{k} {r[k]:.3f}" for k in ("prepare_s", "mask_fill_s", "accept_s", "mask_apply_s")
                            if k in r)
        print(f"{name:>13}: {r['output_tok_per_s']:.1f} out tok/s, {r['steps']} steps, {r['step_ms']:.2f} ms/step"
              + (f"  (per step, ms: {grammar})" if grammar else "")
              + (f"  grammar job started early in {r['early_starts']:.0f} steps" if grammar and "early_starts" in r
                 else ""))
    print(f"json_object slowdown: {100 * result['json_object_slowdown']:.1f}%")
    append_json_line(args.json, {**result, "args": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
