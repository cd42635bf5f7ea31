"""The Gluon fp8 decode GEMM (kernels/fp8_gemv_gluon.py) per shape and config against the Triton decode kernels'
table entry, at M = 1: what fills ``FP8_GEMV_CONFIGS`` in ``kernels/fp8_linear.py``.

    python benchmarks/bench_fp8_gemv.py                          # Llama-3.1-8B's four layer shapes
    python benchmarks/bench_fp8_gemv.py --models llama-3.2-1b qwen3-0.6b --no-pdl

Every call is checked against ``fp8_linear_ref`` first. Timing: the calls captured back to back in one CUDA graph,
each on its own copy of the weight (>= 256 MB of copies, so no call reads its weight from L2), median of
``--replays`` replays, per call; with PDL on unless ``--no-pdl`` (the engine's default). ``g{warps}x{chunks}``: x
quantized per token upstream (as ``Fp8Activations`` gives it); ``q{warps}x{chunks}``: bf16 x quantized in the kernel
(``quantize_x``); "table": ``fp8_decode_gemm`` with the GEMV off (the Triton kernels' table entry, given the same
prequantized rows; ``fma`` entries read the bf16 x). It prints each shape's times, fastest first, and the block to
paste. GPU only: Gluon has no interpreter.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_skinny_gemm import time_per_call  # noqa: E402
from kernels import fp8_linear, pdl  # noqa: E402
from kernels.fp8_gemv_gluon import GemvConfig, gluon_fp8_gemv  # noqa: E402

MODEL_SHAPES = {  # (N, K) of qkv, o, gate_up, down; o_proj's rows come unquantized (no Fp8Activations)
    "llama-3.1-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "llama-3.2-1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)},
    "qwen3-0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)},
}
CONFIGS = [GemvConfig(w, c) for w, c in ((2, 2), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4), (16, 2))]
QUANTIZE_X_CONFIGS = [GemvConfig(8, 2, True), GemvConfig(8, 4, True)]
ROTATE_BYTES = 256 << 20
TABLE = "table"


def label(config: GemvConfig) -> str:
    return f"{'q' if config.quantize_x else 'g'}{config.warps}x{config.chunks}"


def pick(times: dict[str, float], prequantized: bool) -> GemvConfig | None:
    """A shape's table entry: the fastest GEMV config that serves the layer's rows (``prequantized``: they come with
    their e4m3 quantization, as qkv's, gate_up's and down's do in the Llama family; else only ``quantize_x``
    configs serve them), if it beats the Triton table's time; else None."""
    configs = {label(c): c for c in CONFIGS + QUANTIZE_X_CONFIGS if prequantized or c.quantize_x}
    timed = {name: t for name, t in times.items() if name in configs}
    if not timed:
        return None
    best = min(timed, key=timed.get)
    return configs[best] if TABLE not in times or timed[best] < times[TABLE] else None


def config_block(picks: dict[tuple[int, int], tuple[str, GemvConfig | None, dict[str, float]]]) -> str:
    """``FP8_GEMV_CONFIGS`` lines: ``(N, K): config,  # name: its time, the table's``."""
    lines = []
    for (n, k), (name, config, times) in picks.items():
        ours = f"{times[label(config)]:.1f}" if config is not None else "-"
        entry = "None" if config is None else (f"GemvConfig({config.warps}, {config.chunks}"
                                               + (", quantize_x=True)" if config.quantize_x else ")"))
        lines.append(f"    ({n}, {k}): {entry},  # {name}: {ours} us, table {times.get(TABLE, float('nan')):.1f}")
    return "\n".join(lines)


def time_shape(n: int, k: int, replays: int, gen: torch.Generator) -> dict[str, float]:
    """Each config's (and the table's) microseconds per call at M = 1, after checking its output."""
    base_w, base_s = fp8_linear.quantize_per_channel(torch.randn(n, k, device="cuda", generator=gen) * 0.05)
    weights = [(base_w.clone(), base_s.clone()) for _ in range(max(3, -(-ROTATE_BYTES // (n * k))))]
    x = torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16)
    xq, x_scale = fp8_linear.quantize_activations_triton(x)
    ref = fp8_linear.fp8_linear_ref(x, base_w, base_s).float()
    table = fp8_linear.pick_fp8_config(1, n, k)  # w8a16 (fma, tl.dot) unless a W8A8 entry
    table_ref = ref if table is not None and table.kind in fp8_linear.MMA_KINDS else (
        fp8_linear.fp8_weight_only_ref(x, base_w, base_s).float())
    calls: dict[str, Callable] = {
        TABLE: lambda w, s: fp8_linear.fp8_decode_gemm(x, w, s, quantized=(xq, x_scale))}
    for config in CONFIGS:
        calls[label(config)] = lambda w, s, c=config: gluon_fp8_gemv(xq, w, s, x_scale=x_scale,
                                                                    out_dtype=torch.bfloat16, config=c)
    for config in QUANTIZE_X_CONFIGS:
        calls[label(config)] = lambda w, s, c=config: gluon_fp8_gemv(x, w, s, config=c)
    times = {}
    enabled = fp8_linear.GEMV_ENABLED
    for name, call in calls.items():
        fp8_linear.GEMV_ENABLED = name != TABLE
        try:
            out = call(base_w, base_s).float()
            expected = table_ref if name == TABLE else ref
            err = ((out - expected).norm() / expected.norm()).item()
            if err > 1e-2:
                raise AssertionError(f"relative error {err:.2e} against fp8_linear_ref")
            times[name] = time_per_call([lambda w=w, s=s: call(w, s) for w, s in weights], replays) * 1e3
        except Exception as exc:  # a config that does not compile, or a wrong result: reported, not timed
            print(f"#   {n}x{k} {name}: {type(exc).__name__}: {str(exc)[:160]}")
        finally:
            fp8_linear.GEMV_ENABLED = enabled
    return times


def gemv_bench_setup(description: str, script: str,
                     add_options: Callable[[argparse.ArgumentParser], object] | None = None
                     ) -> tuple[argparse.Namespace, torch.Generator] | None:  # fmt: skip
    """A GEMV bench's options (``--models``, ``--replays``, ``--no-pdl``, and what ``add_options(parser)`` adds),
    PDL configured from them and a seeded CUDA generator; None (after saying why) without a GPU: Gluon has no
    interpreter."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=["llama-3.1-8b"], choices=sorted(MODEL_SHAPES))
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--no-pdl", action="store_true", help="launch without programmatic dependent launch")
    if add_options is not None:
        add_options(parser)
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"{script} times a Gluon kernel: it needs a CUDA GPU (Gluon has no interpreter)")
        return None
    pdl.configure(not opts.no_pdl)
    return opts, torch.Generator(device="cuda").manual_seed(0)


def main() -> int:
    setup = gemv_bench_setup(__doc__.split("\n\n")[0], "bench_fp8_gemv.py")
    if setup is None:
        return 1
    opts, gen = setup
    picks = {}
    for model in opts.models:
        for layer, (n, k) in MODEL_SHAPES[model].items():
            times = time_shape(n, k, opts.replays, gen)
            ranked = " ".join(f"{name} {t:.1f}" for name, t in sorted(times.items(), key=lambda kv: kv[1]))
            print(f"{model} {layer} ({n}, {k}), floor {n * k / 4.28e12 * 1e6:.1f} us: {ranked}", flush=True)
            picks[(n, k)] = (f"{model} {layer}", pick(times, prequantized=layer != "o"), times)
    print("# paste into FP8_GEMV_CONFIGS (kernels/fp8_linear.py):")
    print(config_block(picks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
