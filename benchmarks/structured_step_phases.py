"""A json_object step against an unconstrained step of the same batch, phase by phase: where the extra host time of
constrained rows goes.

Two passes through one in-process EngineCore on the same prompts: every request under ``json_object`` (objects end
where the grammar ends them), then every request unconstrained and cut to the length its constrained output had, so
both passes run the same decode steps with the same batch at every step (checked: "same batch every step"): the
difference is the grammar's cost alone. Prefills run first, untimed. Each phase of the engine step is timed (wall,
and the engine thread's own CPU time; a timed phase excludes the timed phases inside it) and reported in ms per
step; the last line is the decode steps' wall time of the json_object pass over the unconstrained one.

On CPU (the default here) the model is a tiny dummy Llama with the tokenizer (and the 49,152-token vocabulary) of
``--tokenizer-from`` so that the grammar sees a real vocabulary while the forward stays small; the forward, the
logits and the sampler are CPU compute there (on a GPU they are launches), so "host" leaves them out on CPU.

    OMP_NUM_THREADS=1 python -m benchmarks.structured_step_phases --num-requests 128 --max-tokens 64 --temperature 0
    OMP_NUM_THREADS=1 python -m benchmarks.structured_step_phases --host-bound --grammar-thread on --fill-threads 1
    python -m benchmarks.structured_step_phases --model .models/smollm2-135m --device cuda --workload W1

``--grammar-thread on`` forces the grammar job onto its thread (the engine turns it on with >= 4 CPUs);
``--fill-threads`` and ``--variants`` (rows per fill thread and switch interval, several compared in one run) try
other settings of the grammar job.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.json_lines import append_json_line
from benchmarks.phase_timer import PhaseTimer

# Phases that are device work on a GPU host (launches there) and CPU compute here: left out of "host".
_COMPUTE = ("forward + logits", "sampler")


def tiny_model_with_tokenizer(directory: Path, tokenizer_from: Path) -> Path:
    """A 2-layer, hidden-32 dummy Llama config beside the tokenizer files of ``tokenizer_from`` (its vocabulary
    size), so grammars compile against a real vocabulary."""
    from benchmarks.host_step_phases import tiny_llama_config

    vocab_size = json.loads((tokenizer_from / "config.json").read_text()).get("vocab_size", 49152)
    tiny_llama_config(directory, vocab_size)
    config = json.loads((directory / "config.json").read_text())
    config.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, directory / name)
    return directory


class MaskPickSampler:
    """``--host-bound``'s sampler: for each constrained row a pseudo-random allowed token of its grammar mask (the
    first allowed word at or after a random word, its lowest allowed bit: a few tensor ops for the whole batch),
    token 100 for the other rows. The outputs are valid for their grammar, the cost is a fraction of a millisecond."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        import torch

        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits, batch):
        import torch

        from core.sampler import SamplerOutput

        tokens = torch.full((logits.shape[0],), 100, dtype=torch.int64)
        if batch.grammar is not None:
            rows, mask = batch.grammar
            num_words = mask.shape[1]
            # A window of words from a random one: most rows allow a token in it; the others take their first word.
            start = torch.randint(0, num_words, (rows.numel(), 1), generator=self.generator)
            cols = (start + torch.arange(min(64, num_words))[None, :]) % num_words
            hit = mask.gather(1, cols) != 0
            word = cols.gather(1, hit.int().argmax(-1, keepdim=True))[:, 0]
            missed = ~hit.any(-1)
            if bool(missed.any()):
                word[missed] = (mask[missed] != 0).int().argmax(-1)
            bits = mask.gather(1, word[:, None])[:, 0].long() & 0xFFFFFFFF
            token = word * 32 + torch.log2((bits & -bits).double()).long()
            tokens[rows] = torch.where(token < self.vocab_size, token, 100)
        return SamplerOutput(tokens)


def make_host_bound(engine) -> None:
    """CPU only: make the engine loop host-bound as it is on the GPU, where the forward and the sampler are launches
    that return at once. The forward returns zeros, the logits are one random tensor made once, the sampler is
    ``MaskPickSampler``: no CPU compute is left in the step, so a grammar job races the engine's own host work
    (schedule, plan, staging, bookkeeping) as it does on the H200, instead of hiding behind a CPU forward and a CPU
    bitmask pass many times longer."""
    import torch

    runner = engine.runner
    model = runner.model
    logits = torch.randn(runner.max_num_batched_tokens + runner.max_num_seqs, runner.vocab_size)

    def forward(input_ids, *args, **kwargs):
        return torch.zeros(input_ids.shape[0], 1)

    model.forward = forward
    model.compute_logits = lambda hidden: logits[: hidden.shape[0]]
    runner.sampler = MaskPickSampler(runner.vocab_size)


def _instrument(engine, timer: PhaseTimer) -> None:
    """Wrap the engine's phases with ``timer`` (exclusive wall and engine-thread CPU time per phase, so nested phases,
    the update run inside ``launch`` say, are counted once and the phases add up to the step; ``timer.unpatch()``
    puts them back)."""
    import core.model_runner as model_runner

    runner = engine.runner
    patch = timer.patch
    patch(engine.scheduler, "schedule", "schedule")
    patch(engine, "_plan", "plan (scheduler output diffs)")
    patch(runner, "launch", "launch (rest)")
    patch(runner.inputs, "stage", "stage inputs")
    if runner.graphs is not None:  # CUDA graphs: decode steps replay them instead of calling the model
        patch(runner.graphs, "replay", "graph replay (launch)")
    patch(runner.model, "forward", "forward + logits")
    patch(runner.model, "compute_logits", "forward + logits")
    patch(runner.sampler.__class__, "__call__", "sampler")
    patch(model_runner, "build_sampling_batch", "sampling batch (host)")
    patch(model_runner.StepHandle, "result", "read results")
    patch(engine, "_update", "update requests + outputs")
    patch(engine, "_finish_inflight", "finish step (rest)")
    patch(engine, "_start_grammar_job_early", "grammar early look + prepare")
    patch(engine.structured, "bitmask", "grammar bitmask (join + upload)")
    patch(engine.structured, "accept", "grammar accept (inline)")
    patch(runner.batch, "apply", "apply message to worker batch")
    # The grammar's per-row Python on the engine thread, inside the phases above.
    import core.engine as engine_module
    import core.structured_output.manager as manager_module

    patch(engine_module, "_constrained_tokens", "grammar: tokens of the step (per row)")
    for name in ("_to_accept", "_rows_to_fill"):
        if hasattr(engine.structured, name):
            patch(engine.structured, name, f"grammar: {name} (per row)")
    if hasattr(manager_module, "_same_sequences"):
        patch(manager_module, "_same_sequences", "grammar: _same_sequences (per row)")


class GrammarJobTimeline:
    """When each step's grammar job ran against the engine thread: where the engine started it (which look at the
    step in flight found it done, or the fallback inside ``launch``), and, in ms, the job's start delay (submitted
    until its thread runs it: the GIL hand-off), its batched accept and its fill, its head start (submitted until
    the engine thread joins it) and the join's wait (joined until done). A job whose latency exceeds its head start
    makes the engine thread wait: shorten the job or start it earlier."""

    def __init__(self, engine) -> None:
        import core.structured_output.manager as manager_module

        self.engine, self.manager, self.module = engine, engine.structured, manager_module
        self.looks: collections.Counter = collections.Counter()
        self.ms: dict[str, list[float]] = collections.defaultdict(list)
        self._submitted: float | None = None
        self._done: float | None = None
        self._saved = (manager_module._batch_accept_handles,)
        manager, timeline = self.manager, self
        prepare, finish, job = manager.prepare, manager._finish_prepared, manager._accept_and_fill
        batch_accept = manager_module._batch_accept_handles

        def preparing(*args):
            manager._finish_prepared()  # the previous job's join is not this one's
            timeline._submitted, timeline._done = time.perf_counter(), None
            return prepare(*args)

        def finishing():
            submitted, pending = timeline._submitted, manager._prepared is not None
            joined = time.perf_counter()
            out = finish()
            if pending and submitted is not None:
                timeline.ms["head start (submitted -> joined)"].append(1e3 * (joined - submitted))
                done = timeline._done if timeline._done is not None else joined
                timeline.ms["join wait (joined -> done)"].append(1e3 * max(0.0, done - joined))
                timeline.ms["job latency (submitted -> done)"].append(1e3 * (done - submitted))
                timeline._submitted = None
            return out

        def accepting_and_filling(accept_keys, accept_handles, accept_tokens, fill_handles, *rest):
            start = time.perf_counter()
            in_job = timeline._submitted is not None and timeline._done is None
            if in_job:
                timeline.ms["job start delay (submitted -> running)"].append(1e3 * (start - timeline._submitted))
            accept_s = [0.0]

            def timed_accept(handles, tokens):
                t0 = time.perf_counter()
                try:
                    return batch_accept(handles, tokens)
                finally:
                    accept_s[0] += time.perf_counter() - t0

            manager_module._batch_accept_handles = timed_accept
            try:
                return job(accept_keys, accept_handles, accept_tokens, fill_handles, *rest)
            finally:
                manager_module._batch_accept_handles = batch_accept
                end = time.perf_counter()
                if in_job:
                    timeline._done = end
                    timeline.ms["job accept"].append(1e3 * accept_s[0])
                    timeline.ms["job fill"].append(1e3 * (end - start - accept_s[0]))
                    timeline.ms["rows accepted"].append(len(accept_handles))
                    timeline.ms["rows filled"].append(len(fill_handles))
                else:
                    timeline.ms["fill at join (rows not prepared)"].append(1e3 * (end - start))

        manager.prepare, manager._finish_prepared, manager._accept_and_fill = (
            preparing, finishing, accepting_and_filling)

    def before_step(self) -> None:
        self.engine.grammar_job_started_at = None

    def after_step(self) -> None:
        self.looks[getattr(self.engine, "grammar_job_started_at", None) or "no job"] += 1

    def unpatch(self) -> None:
        for name in ("prepare", "_finish_prepared", "_accept_and_fill"):
            vars(self.manager).pop(name, None)
        self.module._batch_accept_handles = self._saved[0]

    def summary(self) -> dict:
        means = {name: sum(v) / len(v) for name, v in self.ms.items() if v}
        medians = {name: sorted(v)[len(v) // 2] for name, v in self.ms.items() if v}
        return {"job_started_at": dict(self.looks), "mean": means, "median": medians}


def run_pass(engine, prompts: list[list[int]], params_list: list, tag: str) -> dict:
    """Run the requests to the end; per phase ms, the batch sizes, and the output lengths."""
    timer = PhaseTimer(cpu=True)
    # A cold prefix cache for every pass: the prefills (untimed) then take the same steps in both passes, so the
    # timed decode steps start at the same point with the same batches.
    engine.reset_prefix_cache()
    for i, (prompt, params) in enumerate(zip(prompts, params_list)):
        engine.add_request(_request(f"{tag}-{i}", prompt, params))
    lengths: dict[str, int] = collections.Counter()
    # The prefills first, untimed: the comparison is about decode steps.
    while any(seq.num_computed_tokens < len(seq.prompt_token_ids)
              for seq in (*engine.scheduler.waiting, *engine.scheduler.running)):
        collect(engine.step(), lengths)
    timeline = GrammarJobTimeline(engine)
    _instrument(engine, timer)
    steps = rows = 0
    batch_sizes: list[int] = []
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        while engine.has_work():
            batch_sizes.append(len(engine.scheduler.running))
            rows += batch_sizes[-1]
            timeline.before_step()
            collect(engine.step(), lengths)
            timeline.after_step()
            steps += 1
    finally:
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        timer.unpatch()
        timeline.unpatch()
    return {"steps": steps, "rows": rows, "wall_s": wall, "cpu_s": cpu, "totals_s": dict(timer.totals),
            "cpu_totals_s": dict(timer.cpu_totals), "batch_sizes": batch_sizes, "lengths": lengths,
            "grammar_job": timeline.summary()}


def collect(outputs, lengths: dict[str, int]) -> None:
    for out in outputs.outputs:
        lengths[out.request_id] += len(out.new_token_ids)


def _request(request_id: str, prompt: list[int], params):
    from ipc.messages import EngineRequest

    return EngineRequest(request_id, prompt, params)


def summarize(result: dict, clock: str = "wall", device: str = "cpu") -> dict[str, float]:
    """ms per step of each phase (timed callees excluded), the step, the step's host time (less the CPU compute),
    and host us per sampled row; ``clock``: "wall", or "cpu" (the engine thread's own CPU time: what a grammar
    thread or another process takes meanwhile does not count)."""
    steps = result["steps"]
    totals, whole = (result["totals_s"], result["wall_s"]) if clock == "wall" else (result["cpu_totals_s"],
                                                                                    result["cpu_s"])
    per_step = {name: 1e3 * seconds / steps for name, seconds in totals.items()}
    per_step["step"] = 1e3 * whole / steps
    per_step["other (engine.step glue)"] = per_step["step"] - sum(
        ms for name, ms in per_step.items() if name != "step")
    # On CPU the forward and the sampler are compute, not host work; on a GPU they are launches (host work).
    compute = sum(per_step.get(n, 0.0) for n in _COMPUTE) if device == "cpu" else 0.0
    per_step["host (step - CPU compute)"] = per_step["step"] - compute
    per_step["host us per row"] = 1e3 * per_step["host (step - CPU compute)"] * steps / max(1, result["rows"])
    return per_step


def run(args: argparse.Namespace) -> dict:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.cpu_threads)
    with tempfile.TemporaryDirectory() as tmp:  # the grammar compiler reads the tokenizer from it later
        model = args.model or str(tiny_model_with_tokenizer(Path(tmp) / "tiny", Path(args.tokenizer_from)))
        return _run(args, model)


def _workload(args: argparse.Namespace) -> tuple[list[list[int]], list[int], float]:
    """(prompts, max_tokens, temperature): W1's (``--workload W1``) or ``--num-requests`` short prompts."""
    if args.workload:
        from benchmarks.throughput import make_workload

        workload = make_workload(args.workload, args.num_requests)
        temperature = workload.temperature if args.temperature is None else args.temperature
        return workload.prompts, workload.max_tokens, temperature
    prompts = [[3 + (7 * i + j) % 5000 for j in range(args.prompt_len)] for i in range(args.num_requests)]
    return prompts, [args.max_tokens] * len(prompts), 0.6 if args.temperature is None else args.temperature


def _run(args: argparse.Namespace, model: str) -> dict:
    import core.structured_output.manager as manager_module
    from core.engine import EngineCore
    from ipc.messages import EngineConfig, SamplingParams, StructuredOutputsParams

    prompts, max_tokens, temperature = _workload(args)
    max_model_len = max(len(p) + m for p, m in zip(prompts, max_tokens)) + 16
    blocks = sum(-(-(len(p) + m + 16) // 16) for p, m in zip(prompts, max_tokens)) + 16
    engine = EngineCore(EngineConfig(
        model=model, load_format="dummy", device=args.device, seed=0, max_num_seqs=len(prompts),
        max_model_len=max_model_len, num_gpu_blocks_override=blocks if args.device == "cpu" else None,
        max_num_batched_tokens=max(8192, max_model_len), async_scheduling=args.async_scheduling == "on"))
    structured = engine.structured
    if args.host_bound:
        if args.device != "cpu":
            raise SystemExit("--host-bound is for CPU runs (a GPU loop is host-bound already)")
        make_host_bound(engine)
    if args.grammar_thread is not None:
        structured.overlap = args.grammar_thread == "on"
    if args.fill_threads is not None:
        structured._num_threads = args.fill_threads
    json_object = StructuredOutputsParams(json_object=True)
    # Warm-up: the grammar's compile, the kernels (and CUDA graphs).
    run_pass(engine, prompts[:4], [SamplingParams(temperature=temperature, max_tokens=8,
                                                  structured_outputs=json_object)] * 4, "warm-json")
    run_pass(engine, prompts[:4], [SamplingParams(temperature=temperature, max_tokens=8, ignore_eos=True)] * 4,
             "warm-plain")
    result: dict = {"device": args.device, "num_requests": len(prompts), "workload": args.workload,
                    "grammar_thread": structured.overlap, "fill_threads": structured._num_threads,
                    "async_scheduling": engine.async_scheduling, "variants": []}
    saved_interval = manager_module.GRAMMAR_SWITCH_INTERVAL_S
    try:
        _run_variants(args, engine, prompts, max_tokens, temperature, result)
    finally:
        manager_module.GRAMMAR_SWITCH_INTERVAL_S = saved_interval
        engine.shutdown()
    return result


def _run_variants(args: argparse.Namespace, engine, prompts: list[list[int]], max_tokens: list[int],
                  temperature: float, result: dict) -> None:
    import core.structured_output.manager as manager_module
    from ipc.messages import SamplingParams, StructuredOutputsParams

    structured = engine.structured
    json_object = StructuredOutputsParams(json_object=True)
    # (An older manager without ``rows_per_fill_thread`` always fills on its most threads: 0.)
    default = f"{getattr(structured, 'rows_per_fill_thread', 0)}:{1e6 * manager_module.GRAMMAR_SWITCH_INTERVAL_S:g}"
    for spec in (args.variants or default).split(","):  # each variant: its own pass pairs (lengths vary by run)
        rows, interval_us = spec.split(":")
        structured.rows_per_fill_thread = int(rows)
        manager_module.GRAMMAR_SWITCH_INTERVAL_S = float(interval_us) / 1e6
        variant: dict = {"rows_per_fill_thread": int(rows), "switch_interval_us": float(interval_us), "ratios": []}
        for repeat in range(args.repeats):
            tag = f"{spec}-{repeat}"
            constrained = [SamplingParams(temperature=temperature, max_tokens=m, structured_outputs=json_object)
                           for m in max_tokens]
            constrained_pass = run_pass(engine, prompts, constrained, f"json{tag}")
            lengths = [constrained_pass["lengths"][f"json{tag}-{i}"] for i in range(len(prompts))]
            plain = [SamplingParams(temperature=temperature, max_tokens=max(1, n), ignore_eos=True) for n in lengths]
            plain_pass = run_pass(engine, prompts, plain, f"plain{tag}")
            for name, r in (("json_object", constrained_pass), ("unconstrained_same_lengths", plain_pass)):
                best = variant.setdefault(name, {"steps": r["steps"], "rows": r["rows"]})
                for clock in ("wall", "cpu"):
                    summary = summarize(r, clock, args.device)
                    kept = best.setdefault(f"{clock}_ms_per_step", summary)
                    best[f"{clock}_ms_per_step"] = {k: min(v, kept.get(k, v)) for k, v in summary.items()}
            # The decode steps' wall time, json_object over unconstrained at the same batches: the grammar's cost.
            variant["ratios"].append(constrained_pass["wall_s"] / plain_pass["wall_s"])
            variant.setdefault("grammar_job", []).append(constrained_pass["grammar_job"])
            variant["mean_batch"] = constrained_pass["rows"] / max(1, constrained_pass["steps"])
            variant["num_closed_at_once"] = sum(n <= 3 for n in lengths)
            variant["same_batches"] = constrained_pass["batch_sizes"] == plain_pass["batch_sizes"]
        result["variants"].append(variant)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.structured_step_phases", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a model directory with a tokenizer (default: a tiny dummy Llama "
                                                 "with --tokenizer-from's tokenizer)")
    p.add_argument("--tokenizer-from", default=".models/smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpu-threads", type=int, default=1)
    p.add_argument("--workload", choices=("W1",), default=None,
                   help="W1's prompts and output lengths (the json_object pass stops where its objects end)")
    p.add_argument("--num-requests", type=int, default=None, help="default: 128, or the workload's")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=None, help="default: the workload's (W1: 0.6), else 0.6")
    p.add_argument("--async-scheduling", choices=("on", "off"), default="on")
    p.add_argument("--grammar-thread", choices=("on", "off"), default=None,
                   help="default: the engine's (on with >= 4 CPUs)")
    p.add_argument("--fill-threads", type=int, default=None,
                   help="at most this many xgrammar mask-fill threads (default: the engine's)")
    p.add_argument("--variants", default=None, metavar="R:S[,R:S...]",
                   help="grammar job settings to compare, each with its own pass pairs: R rows per fill thread (0: "
                        "always the most), S the switch interval in us while a job is in flight (default: the "
                        "engine's, e.g. 64:50; the settings before this branch: 0:200)")
    p.add_argument("--host-bound", action="store_true",
                   help="CPU: no forward, logits or sampling compute (zeros, one random logits tensor, a mask-aware "
                        "pick), so the loop is host-bound as on the GPU and the grammar job's join wait shows")
    p.add_argument("--repeats", type=int, default=2, help="report each phase's least over this many pass pairs")
    p.add_argument("--json", default=None, help="append the result as one JSON line here")
    args = p.parse_args(argv)
    if args.num_requests is None and not args.workload:
        args.num_requests = 128
    result = run(args)
    print(f"{result['num_requests']} requests; grammar thread {'on' if result['grammar_thread'] else 'off'}, up to "
          f"{result['fill_threads']} fill threads")
    for variant in result["variants"]:
        a, b = variant["json_object"], variant["unconstrained_same_lengths"]
        print(f"rows per fill thread {variant['rows_per_fill_thread']}, switch interval "
              f"{variant['switch_interval_us']:g} us: {variant['num_closed_at_once']} requests "
              f"closed their object at once, {a['steps']} decode steps, mean batch {variant['mean_batch']:.1f}, same "
              f"batch every step: {variant['same_batches']}")
        for clock, title in (("wall", "wall"), ("cpu", "engine-thread CPU")):
            x_ms, y_ms = a[f"{clock}_ms_per_step"], b[f"{clock}_ms_per_step"]
            print(f"  {title + ' ms per step (least of ' + str(args.repeats) + ')':<44} {'json_object':>12} "
                  f"{'unconstrained':>14} {'diff':>8}")
            names = sorted(set(x_ms) | set(y_ms), key=lambda n: (n.startswith(("step", "host")), n))
            for name in names:
                x, y = x_ms.get(name, 0.0), y_ms.get(name, 0.0)
                print(f"  {name:<44} {x:12.3f} {y:14.3f} {x - y:8.3f}")
        for job in variant.get("grammar_job", []):
            looks = ", ".join(f"{look} {count}" for look, count in sorted(job["job_started_at"].items()))
            print(f"  grammar job started (steps): {looks}")
            print(f"  {'grammar job (ms, rows)':<44} {'mean':>12} {'median':>14}")
            for name, value in job["mean"].items():
                print(f"  {name:<44} {value:12.3f} {job['median'][name]:14.3f}")
    for variant in result["variants"]:
        ratios = ", ".join(f"{100 * (r - 1):.1f}%" for r in variant["ratios"])
        print(f"rows per fill thread {variant['rows_per_fill_thread']:>4}, switch interval "
              f"{variant['switch_interval_us']:>5g} us: json_object decode steps slower than the same batches "
              f"unconstrained (wall, per repeat): {ratios}")
    append_json_line(args.json, {**result, "args": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
