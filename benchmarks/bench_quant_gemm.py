"""Quantized GEMMs at Llama-3.1-8B's linear shapes: bf16 (cuBLAS and the skinny dispatcher) against fp8 (the
skinny w8a16 Triton kernel, and per-token quantization + ``torch._scaled_mm``) and int4 (the Triton w4a16 kernel,
group 128), per M, in microseconds per call and as a fraction of each format's weight-read floor (weight bytes /
the measured device copy bandwidth). Every kernel is checked against its reference first.

This is what picks the fp8 path per shape (``kernels/fp8_linear.py: SKINNY_MAX_M``) and shows what W3 at fp8 / int4
can reach: at M = 1 a decode step is these four GEMMs per layer.

    python benchmarks/bench_quant_gemm.py            # on the GPU
    python benchmarks/bench_quant_gemm.py --smoke    # tiny shapes on CPU (Triton interpreter): the script runs
    python benchmarks/bench_quant_gemm.py --sweep --m 1 4 16   # + every decode launch config of both kernels

``--sweep`` times the skinny kernels (M <= 16) at each block_n x block_k x split_k x num_warps and prints the best
per (shape, M) beside the default (``kernels/split_k.py: decode_launch``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096), "down_proj": (4096, 14336)}
SMOKE_SHAPES = {"tiny_a": (64, 128), "tiny_b": (48, 256)}
M_VALUES = (1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096)
SMOKE_M_VALUES = (1, 4, 20)
COPIES = 3  # weight copies used in turn, so a shape's weight is not in L2 from the previous call
GROUP = 128
failures: list[str] = []


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--m", type=int, nargs="+", default=None, help="the M values (rows) to time")
    p.add_argument("--sweep", action="store_true", help="also sweep the skinny kernels' launch configs (M <= 16)")
    return p.parse_args()


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cpu" if ARGS.smoke else "cuda"
DTYPE = torch.float16 if ARGS.smoke else torch.bfloat16  # bf16 tl.dot is wrong in the interpreter

from kernels import fp8_linear as fp8  # noqa: E402  (after TRITON_INTERPRET is set)
from kernels.int4_gemm import int4_gemm, int4_linear_ref, pack_int4_rows  # noqa: E402
from kernels.skinny_gemm import linear as skinny_linear  # noqa: E402


def time_per_call(calls: list[Callable[[], object]]) -> float:
    """Milliseconds per call: the calls captured back to back in one CUDA graph, median replay / len(calls). On the
    CPU (--smoke): one pass, wall clock."""
    if DEVICE == "cpu":
        start = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - start) * 1e3 / len(calls)
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(ARGS.replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / len(calls)


def copy_bandwidth() -> float:
    """Device copy bytes/s (read + write): the weight-read floor's bandwidth. The smoke run uses a nominal 1 TB/s."""
    if DEVICE == "cpu":
        return 1e12
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = time_per_call([lambda: dst.copy_(src)] * 4)
    return 2 * src.numel() / ms * 1e3


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    if not err <= tol:
        failures.append(f"{name}: relative error {err:.2e} > {tol:.0e}")


def make_weights(n: int, k: int, gen: torch.Generator) -> dict[str, list]:
    """COPIES of one shape's weight in each format: bf16, fp8 (+ per-channel scales), int4 (packed, scales, zeros)."""
    formats: dict[str, list] = {"bf16": [], "fp8": [], "int4": []}
    for _ in range(COPIES):
        w = (torch.randn(n, k, generator=gen) * 0.02).to(DTYPE)
        formats["bf16"].append(w.to(DEVICE))
        q8, s8 = fp8.quantize_per_channel(w.float())
        formats["fp8"].append((q8.to(DEVICE), s8.to(DEVICE)))
        q4 = torch.randint(0, 16, (k, n), generator=gen)
        scales = (torch.rand(k // GROUP, n, generator=gen) * 0.004 + 0.001).to(DTYPE)
        zeros = torch.randint(0, 16, (k // GROUP, n), generator=gen).to(DTYPE)
        formats["int4"].append((pack_int4_rows(q4).to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE)))
    return formats


def candidates(m: int, weights: dict[str, list]) -> dict[str, tuple[Callable, str]]:
    """name -> (call on copy i and x, the weight format it reads)."""
    runs = {"cublas bf16": (lambda i, x: F.linear(x, weights["bf16"][i]), "bf16")}
    if m <= 16 and DEVICE == "cuda":
        runs["skinny bf16"] = (lambda i, x: skinny_linear(x, weights["bf16"][i]), "bf16")
    if m <= fp8.SKINNY_MAX_M:
        runs["fp8 skinny (w8a16)"] = (lambda i, x: fp8.fp8_skinny_gemm(x, *weights["fp8"][i]), "fp8")
    if DEVICE == "cuda" and fp8.fp8_supported(torch.device(DEVICE)):
        runs["fp8 quant+_scaled_mm"] = (lambda i, x: _scaled_mm_path(x, *weights["fp8"][i]), "fp8")
    runs["int4 triton (w4a16)"] = (lambda i, x: int4_gemm(x, *weights["int4"][i], GROUP), "int4")
    return runs


def _scaled_mm_path(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xq, x_scale = fp8.quantize_activations_triton(x)
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.reshape(1, -1), out_dtype=torch.bfloat16)


def references(x: torch.Tensor, weights: dict[str, list]) -> dict[str, torch.Tensor]:
    q8, s8 = weights["fp8"][0]
    return {"bf16": x.float() @ weights["bf16"][0].float().T,
            "fp8 skinny (w8a16)": fp8.fp8_weight_only_ref(x, q8, s8).float(),
            "fp8 quant+_scaled_mm": fp8.fp8_linear_ref(x, q8, s8).float(),
            "int4": int4_linear_ref(x, *weights["int4"][0], GROUP).float()}


def sweep(name: str, m: int, x: torch.Tensor, weights: dict[str, list]) -> None:
    """Time every decode launch config of the fp8 and int4 skinny kernels; print the default's time and the best."""
    import itertools

    k = x.shape[1]
    kernels = {
        "fp8": (lambda i, **c: fp8.fp8_skinny_gemm(x, *weights["fp8"][i], **c), (64, 128, 256, 512)),
        "int4": (lambda i, **c: int4_gemm(x, *weights["int4"][i], GROUP, **c), (32, 64, 128)),
    }
    for kind, (call, block_ks) in kernels.items():
        default = time_per_call([lambda i=i: call(i) for i in range(COPIES)] * 2)
        best = (default, "default")
        for block_n, block_k, split_k, warps in itertools.product((16, 32, 64, 128), block_ks, (1, 2, 4, 8), (2, 4, 8)):
            if k % block_k or (kind == "int4" and GROUP % block_k) or split_k > k // block_k:
                continue
            config = dict(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=warps)
            try:
                ms = time_per_call([lambda i=i: call(i, **config) for i in range(COPIES)] * 2)
            except Exception as exc:  # a config the compiler rejects (registers, shared memory)
                print(f"#   {kind} {config}: {type(exc).__name__}")
                continue
            best = min(best, (ms, str(config)))
        print(f"# sweep {name} M={m} {kind}: default {default * 1e3:.1f} us, best {best[0] * 1e3:.1f} us {best[1]}")


def main() -> int:
    shapes = SMOKE_SHAPES if ARGS.smoke else SHAPES
    m_values = ARGS.m or (SMOKE_M_VALUES if ARGS.smoke else M_VALUES)
    bandwidth = copy_bandwidth()
    print(f"# device {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu (interpreter)'}, {DTYPE}, "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    bytes_per_weight = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5 + 2 * 2 / GROUP}  # int4: + fp16 scales and zeros
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in shapes.items():
        weights = make_weights(n, k, gen)
        print(f"\n## {name}: N={n} K={k}")
        print(f"{'M':>6} {'kernel':>22} {'us':>9} {'floor us':>9} {'of floor':>9} {'vs cuBLAS bf16':>15}")
        for m in m_values:
            x = torch.randn(m, k, generator=gen).to(DTYPE).to(DEVICE)
            refs = references(x, weights)
            base = None
            for label, (call, fmt) in candidates(m, weights).items():
                out = call(0, x)
                ref = refs.get(label, refs["int4"] if fmt == "int4" else refs["bf16"])
                check(f"{name} M={m} {label}", out, ref, 2e-2)
                ms = time_per_call([lambda i=i: call(i, x) for i in range(COPIES)] * 2)
                floor_ms = n * k * bytes_per_weight[fmt] / (bandwidth / 2) * 1e3
                base = base or ms
                print(f"{m:>6} {label:>22} {ms * 1e3:>9.1f} {floor_ms * 1e3:>9.1f} {floor_ms / ms:>9.0%} "
                      f"{base / ms:>14.2f}x")
            if ARGS.sweep and m <= 16:
                sweep(name, m, x, weights)
        del weights
    if failures:
        print("# correctness check FAILURES:\n" + "\n".join(failures))
        return 1
    print("# all correctness checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
