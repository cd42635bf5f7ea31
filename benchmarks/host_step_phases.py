"""Host time per decode step, by phase, on CPU: schedule, build the scheduler -> runner message, apply it to the
runner's persistent batch, stage inputs, the rest of the launch, update. A tiny Llama with dummy weights (and a
small vocabulary) keeps the forward and the sampler small, so what is left is the engine's host work.

    OMP_NUM_THREADS=1 python -m benchmarks.host_step_phases --num-seqs 256 --steps 50

Runs against older commits too (phases a commit lacks read 0): ``PYTHONPATH=<other worktree> python
benchmarks/host_step_phases.py`` compares the same measurement across commits.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

from benchmarks.json_lines import append_json_line
from benchmarks.profile_step import _timed


def tiny_llama_config(directory: Path, vocab_size: int) -> Path:
    """A config.json for a 2-layer, hidden-64 Llama (weights drawn with ``--load-format dummy``)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# Phases nested inside ``launch`` (subtracted from it to give "launch (rest)").
_INSIDE_LAUNCH = ("apply message to worker batch", "stage inputs", "forward + logits (CPU compute)", "sampler")


def measure(args: argparse.Namespace, model_dir: Path) -> dict[str, float]:
    """Milliseconds per step of each phase over ``args.steps`` steady decode steps."""
    import torch

    import core.model_runner as model_runner
    from core.engine import EngineCore
    from ipc.messages import EngineConfig, EngineRequest, SamplingParams

    torch.set_num_threads(1)
    blocks_per_seq = -(-(args.prompt_len + args.warmup_steps + args.steps * args.repeats + 8) // 16)
    num_blocks = max(args.num_seqs * blocks_per_seq, args.max_model_len // 16) + 16
    engine = EngineCore(EngineConfig(model=str(model_dir), load_format="dummy", device="cpu", seed=0,
                                     max_num_seqs=args.num_seqs, max_model_len=args.max_model_len,
                                     max_num_batched_tokens=max(args.num_seqs * args.prompt_len, 2048),
                                     num_gpu_blocks_override=num_blocks,
                                     async_scheduling=args.async_scheduling == "on"))
    for i in range(args.num_seqs):
        prompt = [(7 * i + j) % 500 + 3 for j in range(args.prompt_len)]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_model_len - args.prompt_len, ignore_eos=True)
        engine.add_request(EngineRequest(str(i), prompt, params))
    for _ in range(args.warmup_steps):  # past the prefills
        engine.step()
    running = len(engine.scheduler.running)
    if running != args.num_seqs:
        raise RuntimeError(f"{running} sequences running after warm-up, expected {args.num_seqs}")

    totals: dict[str, float] = collections.defaultdict(float)
    runner = engine.runner
    engine.scheduler.schedule = _timed(totals, "schedule", engine.scheduler.schedule)
    builder = getattr(engine, "plan_builder", None)
    if builder is not None:  # the SchedulerOutput message (absent before it existed)
        builder.build = _timed(totals, "build message", builder.build)
    if hasattr(runner, "batch"):  # the runner's persistent batch from the message
        runner.batch.apply = _timed(totals, "apply message to worker batch", runner.batch.apply)
        for name in ("row", "rows"):  # block-table rows: per sequence (the first message), per step (slots)
            if hasattr(runner.batch, name):
                timed = _timed(totals, "apply message to worker batch", getattr(runner.batch, name))
                setattr(runner.batch, name, timed)
    else:  # before the message: the runner synced block-table rows from the KV manager's blocks
        runner.input_batch.row = _timed(totals, "apply message to worker batch", runner.input_batch.row)
    runner.inputs.stage = _timed(totals, "stage inputs", runner.inputs.stage)
    runner.model.forward = _timed(totals, "forward + logits (CPU compute)", runner.model.forward)
    runner.model.compute_logits = _timed(totals, "forward + logits (CPU compute)", runner.model.compute_logits)
    sampler_cls = runner.sampler.__class__
    original_call = sampler_cls.__call__
    sampler_cls.__call__ = _timed(totals, "sampler", original_call)
    runner.launch = _timed(totals, "launch", runner.launch)
    original_result = model_runner.StepHandle.result
    model_runner.StepHandle.result = _timed(totals, "read results", original_result)
    engine._update = _timed(totals, "update", engine._update)
    best: dict[str, float] = {}
    try:
        for _ in range(args.repeats):  # the least of each phase over the repeats: other load on the CPU only adds
            totals.clear()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            wall = time.perf_counter() - t0
            per_step = {name: seconds / args.steps * 1e3 for name, seconds in totals.items()}
            launch = per_step.pop("launch", 0.0)
            per_step["launch (rest)"] = launch - sum(per_step.get(name, 0.0) for name in _INSIDE_LAUNCH)
            per_step["step wall"] = wall / args.steps * 1e3
            per_step["host (wall - CPU compute)"] = per_step["step wall"] - per_step.get(
                "forward + logits (CPU compute)", 0.0) - per_step.get("sampler", 0.0)
            best = {name: min(ms, best.get(name, ms)) for name, ms in per_step.items()}
    finally:
        sampler_cls.__call__ = original_call
        model_runner.StepHandle.result = original_result
    return best


PHASES = ("schedule", "build message", "apply message to worker batch", "stage inputs", "launch (rest)",
          "forward + logits (CPU compute)", "sampler", "read results", "update", "step wall",
          "host (wall - CPU compute)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3,
                   help="measure this many runs of --steps; report each phase's least")
    p.add_argument("--async-scheduling", choices=["on", "off"], default="on",
                   help="on: the next step is launched before the last one's tokens are read (as on a GPU)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--json", default=None, help="append the per-phase ms as one JSON line here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        per_step = measure(args, tiny_llama_config(Path(tmp) / "tiny-llama", args.vocab_size))
    print(f"{args.num_seqs} sequences decoding, {args.steps} steps, least of {args.repeats} runs, async scheduling "
          f"{args.async_scheduling} (ms/step):")
    for name in PHASES:
        print(f"  {name:<34} {per_step.get(name, 0.0):8.3f}")
    append_json_line(args.json, {"num_seqs": args.num_seqs, "steps": args.steps, "repeats": args.repeats,
                                 "async_scheduling": args.async_scheduling, "ms_per_step": per_step})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
