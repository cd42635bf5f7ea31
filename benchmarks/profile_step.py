"""Where a step's time goes: host time per phase (schedule, input staging, launch, wait for the GPU, update) and
the top GPU kernels, measured on steady-state decode steps of a workload.

    python -m benchmarks.profile_step --model .models/qwen3-0.6b --workload W1 --steps 50
    python -m benchmarks.profile_step --model .models/qwen3-0.6b --decode-variant lpt-db32-fused \
        --skinny-config fma:8x512:w4:p0
    python -m benchmarks.profile_step --model .models/smollm2-135m --json-object   # every request json_object

With ``--json-object`` (a model directory with a tokenizer) the grammar work on the engine thread is timed too:
``prepare`` (hand the last tokens and next rows to the grammar thread), ``bitmask`` (wait for the masks, upload) and
``accept`` (advance matchers when no mask job ran); the mask apply shows among the GPU kernels. It also counts the
steps whose grammar job started right after scheduling (the step in flight already done on the device) rather than
after the forward was queued.

The kernel switches (decode-attention variant, skinny-GEMM settings) are set in this process before the engine is
built, so the profiled steps (and the CUDA graphs captured for them) use them.
"""

from __future__ import annotations

import argparse
import logging
import collections
import functools
import time

from benchmarks.throughput import make_workload


def _timed(totals: dict[str, float], name: str, fn, count_calls: bool = False):
    """``fn`` adding its wall time to ``totals[name]`` (and, with ``count_calls``, 1 to ``totals[name + "_calls"]``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t0
            if count_calls:
                totals[name + "_calls"] += 1

    return wrapper


def _set_kernel_switches(args: argparse.Namespace) -> None:
    from kernels import skinny_gemm

    if args.decode_variant:
        from benchmarks.decode_attention_variants import set_decode_variant

        set_decode_variant(args.decode_variant)
    skinny_gemm.configure(enabled=not args.no_skinny_gemm, max_m=args.skinny_max_m, forced_config=args.skinny_config)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--workload", default="W1")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--trace", default=None, help="write a Chrome trace of the profiled steps here (with PDL the "
                   "kernel times above overlap: benchmarks/trace_critical_path.py charges each by its end)")
    p.add_argument("--decode-variant", default=None, help="a name of benchmarks/decode_attention_variants.py")
    p.add_argument("--skinny-config", default=None, help="force one skinny-GEMM config, e.g. fma:8x512:w4:p0")
    p.add_argument("--skinny-max-m", type=int, default=None, help="largest M that takes the skinny GEMM")
    p.add_argument("--no-enable-pdl", action="store_true", help="no programmatic dependent launch (kernels/pdl.py)")
    p.add_argument("--no-skinny-gemm", action="store_true", help="cuBLAS for every linear layer")
    p.add_argument("--json-object", action="store_true", help="every request under response_format json_object")
    p.add_argument("--quantization", default=None, help="as LLM(quantization=...), e.g. fp8")
    p.add_argument("--kv-cache-dtype", default="auto", help="as LLM(kv_cache_dtype=...)")
    p.add_argument("--top", type=int, default=15, help="how many kernels to list")
    p.add_argument("--async-scheduling", choices=("on", "off"), default=None,
                   help="default: the engine's (on with CUDA)")
    p.add_argument("--grammar-switch-interval-us", type=float, default=None,
                   help="CPython switch interval while a grammar job is in flight (default: the engine's, "
                        "core.structured_output.manager.GRAMMAR_SWITCH_INTERVAL_S)")
    args = p.parse_args(argv)
    _set_kernel_switches(args)

    import torch

    from frontend import LLM, SamplingParams
    from ipc.messages import EngineRequest, StructuredOutputsParams

    if args.grammar_switch_interval_us is not None:
        from core.structured_output import manager

        manager.GRAMMAR_SWITCH_INTERVAL_S = args.grammar_switch_interval_us / 1e6

    llm = LLM(args.model, load_format=args.load_format, max_model_len=args.max_model_len, skip_tokenizer_init=not args.json_object,
              enforce_eager=args.enforce_eager, enable_pdl=not args.no_enable_pdl, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype,
              async_scheduling=None if args.async_scheduling is None else args.async_scheduling == "on")
    engine = llm.engine
    workload = make_workload(args.workload, args.num_prompts)
    if args.json_object:  # compile the grammar and the mask kernels outside the profiled steps
        for i, prompt in enumerate(workload.prompts[:8]):
            params = SamplingParams(temperature=workload.temperature, max_tokens=32,
                                    structured_outputs=StructuredOutputsParams(json_object=True))
            engine.add_request(EngineRequest(f"warm-{i}", prompt, params))
        while engine.has_work():
            engine.step()
    for i, (prompt, max_tokens) in enumerate(zip(workload.prompts, workload.max_tokens)):
        params = SamplingParams(temperature=workload.temperature, max_tokens=max_tokens, ignore_eos=not args.json_object,
                                structured_outputs=StructuredOutputsParams(json_object=True) if args.json_object else None)
        engine.add_request(EngineRequest(str(i), prompt, params))
    for _ in range(args.warmup_steps):  # past the prefills
        engine.step()

    totals: dict[str, float] = collections.defaultdict(float)
    runner = engine.runner
    engine.scheduler.schedule = _timed(totals, "schedule", engine.scheduler.schedule)
    runner.inputs.stage = _timed(totals, "stage inputs (numpy + H2D)", runner.inputs.stage)
    if runner.graphs is not None:
        runner.graphs.replay = _timed(totals, "graph replay (launch)", runner.graphs.replay)
    runner.sampler.__class__.__call__ = _timed(totals, "sampler (launch)", runner.sampler.__class__.__call__)
    import core.model_runner as model_runner

    model_runner.StepHandle.result = _timed(totals, "wait for GPU + read tokens", model_runner.StepHandle.result)
    # Two more per-row host phases, so that "other host time" is what is left of the step's glue.
    engine._plan = _timed(totals, "plan (scheduler output diffs)", engine._plan)
    model_runner.build_sampling_batch = _timed(totals, "sampling batch (host)", model_runner.build_sampling_batch)
    engine._update = _timed(totals, "update requests + outputs", engine._update)
    early_starts = collections.Counter()
    if args.json_object:
        structured = engine.structured
        for name in ("prepare", "bitmask", "accept"):
            setattr(structured, name, _timed(totals, f"grammar {name}", getattr(structured, name)))
        start_early = engine._start_grammar_job_early

        def counting_start_early(*args):
            started = start_early(*args)
            early_starts[started] += 1
            return started

        engine._start_grammar_job_early = counting_start_early

    batch_sizes = []
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            batch_sizes.append(len(engine.scheduler.running))
            engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    print(f"{args.steps} steps, batch {min(batch_sizes)}..{max(batch_sizes)}, "
          f"{wall / args.steps * 1e3:.2f} ms/step wall")
    accounted = 0.0
    for name, seconds in totals.items():
        print(f"  {name:<32} {seconds / args.steps * 1e3:8.3f} ms/step")
        accounted += seconds
    print(f"  {'other host time':<32} {(wall - accounted) / args.steps * 1e3:8.3f} ms/step")
    if args.json_object:
        print(f"grammar job started right after scheduling in {early_starts[True]} of {args.steps} steps "
              f"({early_starts[False]} looks found the step in flight still running)")
    kernel_time = collections.Counter()
    kernel_calls = collections.Counter()
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernel_time[event.key] += getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
            kernel_calls[event.key] += event.count
    total_gpu = sum(kernel_time.values())
    print(f"GPU busy {total_gpu / args.steps / 1e3:.2f} ms/step in {sum(kernel_calls.values()) / args.steps:.0f} "
          f"kernels/step; top kernels (ms/step, calls/step, us/call):")
    for name, us in kernel_time.most_common(args.top):
        calls = kernel_calls[name] / args.steps
        print(f"  {us / args.steps / 1e3:8.3f} {calls:6.1f} {us / args.steps / max(calls, 1e-9):8.1f}  {name[:90]}")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
