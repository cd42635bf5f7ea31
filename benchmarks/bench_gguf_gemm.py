"""GGUF block GEMM (``kernels/gguf_gemm.py``) per type and M against bf16 cuBLAS on the same shapes, in microseconds
per call and as a fraction of the type's weight-read floor (weight bytes / the measured device copy bandwidth).
Every kernel is checked against the torch reference first (a failure is printed and makes the exit status 1).

Shapes: the default SmolLM2-135M's layers (its GGUF: Q4_1 linears, Q8_0 embedding = tied LM head) and Llama-3.1-8B's
(K-quants need K a multiple of 256).

    python benchmarks/bench_gguf_gemm.py                      # on the GPU, every type
    python benchmarks/bench_gguf_gemm.py --types Q4_1 Q8_0 --m 1 8 64
    python benchmarks/bench_gguf_gemm.py --smoke              # tiny shapes on CPU (Triton interpreter)
    python benchmarks/bench_gguf_gemm.py --types Q4_1 Q8_0 --m 1 4 --sweep-small   # word-load kernel configs

``--sweep-small`` times, for the word-load decode kernel's types and M <= 4, the byte-gather kernel (``old``) and
each config of ``SMALL_SWEEP`` beside the default, and prints the fastest per (type, M == 1) summed over the shapes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # name -> (N, K)
    "smollm2.qkv_proj": (960, 576), "smollm2.o_proj": (576, 576), "smollm2.gate_up_proj": (3072, 576),
    "smollm2.down_proj": (576, 1536), "smollm2.lm_head": (49152, 576),
    "llama8b.qkv_proj": (6144, 4096), "llama8b.o_proj": (4096, 4096), "llama8b.gate_up_proj": (28672, 4096),
    "llama8b.down_proj": (4096, 14336),
}
SMOKE_SHAPES = {"tiny_a": (48, 256), "tiny_b": (40, 512)}
M_VALUES = (1, 4, 16, 64, 256, 1024)
SMOKE_M_VALUES = (1, 20)
TYPE_NAMES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
GRAPH_CALLS = 16
L2_BYTES = 50 << 20
SMALL_SWEEP = [(bn, nb, w) for bn in (16, 32, 64) for nb in (2, 4, 8) for w in (4, 8) if bn * nb <= 256]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    p.add_argument("--types", nargs="+", choices=TYPE_NAMES, default=list(TYPE_NAMES))
    p.add_argument("--m", type=int, nargs="+", default=None, help="the M values (rows) to time")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--sweep-small", action="store_true", help="time the word-load decode kernel's configs (M <= 4)")
    return p.parse_args(argv)


def time_us(fn, replays: int, device: str) -> float:
    """Median microseconds per ``fn(copy)`` call: on the GPU inside one CUDA graph of ``GRAPH_CALLS`` calls that
    rotate over the weight copies (no Python launch cost or host sync in the figure); on CPU one wall-clock call."""
    if device == "cuda":
        from benchmarks.graph_timing import median_us_per_launch

        return median_us_per_launch(fn, GRAPH_CALLS, replays=max(1, replays // 4))
    fn(0)
    samples = []
    for i in range(replays):
        start = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def weight_copies(raw: torch.Tensor, device: str) -> list[torch.Tensor]:
    """``raw`` and enough copies of it that together they are >= 4x the 50 MB L2 (at most GRAPH_CALLS): every timed
    call reads its weight from HBM."""
    count = 1 if device != "cuda" else max(2, min(GRAPH_CALLS, -(-4 * L2_BYTES // max(1, raw.numel()))))
    return [raw] + [raw.clone() for _ in range(count - 1)]


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (the floor's denominator), timed eagerly: long enough that
    the launch does not count (inside a graph of 16 such copies it measured 2.7 TB/s against 4.0-4.2 eagerly)."""
    if device != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    samples = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return 2 * src.numel() / statistics.median(samples[1:])  # read + write


def q4_as_int4(raw: torch.Tensor, ggml_type: int, k: int, dtype: torch.dtype) -> tuple:
    """A Q4_0 / Q4_1 / Q4_K weight as the engine repacks it on CUDA: ``(qweight, scales, zeros)`` for
    ``int4_linear``."""
    from kernels.gguf_gemm import q4_blocks_as_int4
    from kernels.int4_gemm import pack_int4_kernel

    codes, scales, zeros = q4_blocks_as_int4(raw, ggml_type, k, dtype)
    return pack_int4_kernel(codes), scales, zeros


def ggml_like_q4_1(raw: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks as ggml writes them (``d = (max - min) / 15 > 0``, ``m = min``, here ``-7.5 d``: weights centred
    on zero) instead of random signed ``d`` and ``m``, whose ``-m / d`` can pass fp16's range."""
    blocks = raw.reshape(raw.shape[0], -1, 20)
    d = (blocks[..., 0:2].contiguous().view(torch.float16).float().abs() + 1e-5).half()
    blocks[..., 0:2] = d.view(torch.uint8)
    blocks[..., 2:4] = (d.float() * -7.5).half().view(torch.uint8)
    return raw


def sweep_small(types: list[str], shapes: dict, m_values: list[int], replays: int, device: str) -> list[str]:
    """Per (type, M): total microseconds over the shapes of the byte-gather kernel and of each word-load config."""
    from gguf import GGMLQuantizationType

    import kernels.gguf_gemm as module
    from tests.kernels.test_gguf_gemm import random_blocks

    failures = []
    defaults = dict(module.SMALL_DECODE_CONFIGS)
    for type_name in types:
        ggml_type = int(GGMLQuantizationType[type_name])
        if (ggml_type, True) not in defaults:
            continue
        _, type_size = module.GGUF_KERNEL_TYPES[ggml_type]
        weights = {name: weight_copies(torch.from_numpy(random_blocks(ggml_type, n, k, seed=n + k, scale=1e-3))
                                       .to(device), device) for name, (n, k) in shapes.items()}
        for m in [m for m in m_values if m <= module.SMALL_DECODE_MAX_M]:
            xs = {name: torch.randn(m, shapes[name][1], dtype=torch.bfloat16, device=device) for name in shapes}
            totals: dict[str, float] = {}
            for config in ["old", "default", *(SMALL_SWEEP if device == "cuda" else SMALL_SWEEP[:2])]:
                saved_max_m = module.SMALL_DECODE_MAX_M
                if config == "old":
                    module.SMALL_DECODE_MAX_M = 0
                elif config != "default":
                    module.SMALL_DECODE_CONFIGS[ggml_type, m == 1] = config
                try:
                    total = 0.0
                    for name, raws in weights.items():
                        x, raw = xs[name], raws[0]
                        out = module.gguf_gemm(x, raw, ggml_type)
                        ref = module.gguf_linear_ref(x, raw, ggml_type, out_dtype=torch.float32)
                        err = (out.float() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6)
                        if not err < 2e-2:
                            failures.append(f"{type_name} {config} {name} M={m}: relative error {err:.3g}")
                        total += time_us(lambda i: module.gguf_gemm(x, raws[i % len(raws)], ggml_type), replays, device)
                    totals[str(config)] = total
                except Exception as exc:  # a config that does not compile (registers, shared memory)
                    print(f"{type_name} M={m} {config}: {type(exc).__name__}: {str(exc)[:120]}")
                finally:
                    module.SMALL_DECODE_MAX_M = saved_max_m
                    module.SMALL_DECODE_CONFIGS.update(defaults)
            ranked = sorted(totals.items(), key=lambda item: item[1])
            print(f"{type_name} M={m}: old {totals.get('old', float('nan')):.1f} us, default "
                  f"{totals.get('default', float('nan')):.1f} us, best " +
                  ", ".join(f"{name} {us:.1f}" for name, us in ranked[:5]))
    return failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    from gguf import GGMLQuantizationType

    from kernels.gguf_gemm import GGUF_KERNEL_TYPES, INT4_TYPES, Q4_0, Q4_1, Q4_K, gguf_gemm, gguf_linear_ref
    from kernels.int4_gemm import int4_linear
    from tests.kernels.test_gguf_gemm import quantize_q4_k, random_blocks

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float16 if args.smoke else torch.bfloat16  # bf16 tl.dot is wrong in the interpreter
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    m_values = args.m or (SMOKE_M_VALUES if args.smoke else M_VALUES)
    replays = 1 if args.smoke else args.replays
    bandwidth = copy_bandwidth(device)
    failures = []
    print(f"device={device} dtype={dtype} copy bandwidth={bandwidth / 1e9:.0f} GB/s")
    if args.sweep_small:
        failures = sweep_small(args.types, shapes, m_values, replays, device)
        for failure in failures:
            print("FAILED", failure)
        return 1 if failures else 0
    print(f"{'type':6} {'shape':22} {'N':>6} {'K':>6} {'M':>5} {'gguf us':>9} {'bf16 us':>9} {'speedup':>8} "
          f"{'floor us':>9} {'of floor':>8} {'int4 us':>9}")
    for type_name in args.types:
        ggml_type = int(GGMLQuantizationType[type_name])
        block, type_size = GGUF_KERNEL_TYPES[ggml_type]
        for shape_name, (n, k) in shapes.items():
            if k % block:
                continue
            raw = torch.from_numpy(random_blocks(ggml_type, n, k, seed=n + k, scale=1e-3)).to(device)
            if ggml_type == Q4_1:
                raw = ggml_like_q4_1(raw)
            if ggml_type == Q4_K:  # ggml-like blocks of Gaussian weights (d, dmin > 0): zero points in range
                gaussian = np.random.default_rng(n + k).standard_normal((n, k), dtype=np.float32) * 0.02
                raw = torch.from_numpy(quantize_q4_k(gaussian)).to(device)
            raws = weight_copies(raw, device)
            dense = torch.randn(n, k, dtype=dtype, device=device)
            denses = weight_copies(dense, device)
            floor_us = raw.numel() / bandwidth * 1e6
            int4s = [q4_as_int4(r, ggml_type, k, dtype) for r in raws] if ggml_type in INT4_TYPES else None
            for m in m_values:
                x = torch.randn(m, k, dtype=dtype, device=device)
                out = gguf_gemm(x, raw, ggml_type)
                ref = gguf_linear_ref(x, raw, ggml_type, out_dtype=torch.float32)
                err = (out.float() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6)
                if not err < 2e-2:
                    failures.append(f"{type_name} {shape_name} M={m}: relative error {err:.3g}")
                us = time_us(lambda i: gguf_gemm(x, raws[i % len(raws)], ggml_type), replays, device)
                bf16_us = time_us(lambda i: F.linear(x, denses[i % len(denses)]), replays, device)
                int4_us = float("nan")
                if int4s is not None:  # what the engine runs for Q4_0 / Q4_1 / Q4_K layers on CUDA (repacked)
                    zeros_whole = ggml_type == Q4_0
                    got = int4_linear(x, *int4s[0], 32, integer_zeros=zeros_whole, backend="triton")
                    err = (got.float() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6)
                    if not err < 2e-2:
                        failures.append(f"{type_name} int4 {shape_name} M={m}: relative error {err:.3g}")
                    int4_us = time_us(lambda i: int4_linear(x, *int4s[i % len(int4s)], 32, integer_zeros=zeros_whole,
                                                            backend="triton"), replays, device)  # fmt: skip
                print(f"{type_name:6} {shape_name:22} {n:6} {k:6} {m:5} {us:9.1f} {bf16_us:9.1f} "
                      f"{bf16_us / us:8.2f} {floor_us:9.1f} {floor_us / us:8.2f} {int4_us:9.1f}")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
