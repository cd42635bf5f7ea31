"""GGUF block GEMM (``kernels/gguf_gemm.py``) per type and M against bf16 cuBLAS on the same shapes, in microseconds
per call and as a fraction of the type's weight-read floor (weight bytes / the measured device copy bandwidth).
Every kernel is checked against the torch reference first (a failure is printed and makes the exit status 1).

Shapes: the default SmolLM2-135M's layers (its GGUF: Q4_1 linears, Q8_0 embedding = tied LM head) and Llama-3.1-8B's
(K-quants need K a multiple of 256).

    python benchmarks/bench_gguf_gemm.py                      # on the GPU, every type
    python benchmarks/bench_gguf_gemm.py --types Q4_1 Q8_0 --m 1 8 64
    python benchmarks/bench_gguf_gemm.py --smoke              # tiny shapes on CPU (Triton interpreter)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    p.add_argument("--types", nargs="+", choices=TYPE_NAMES, default=list(TYPE_NAMES))
    p.add_argument("--m", type=int, nargs="+", default=None, help="the M values (rows) to time")
    p.add_argument("--replays", type=int, default=20)
    return p.parse_args(argv)


def time_us(fn, replays: int, device: str) -> float:
    """Median microseconds per call (after a warm-up call)."""
    fn()
    samples = []
    for _ in range(replays):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (the floor's denominator)."""
    if device != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), 10, device)
    return 2 * src.numel() / (us * 1e-6)  # read + write


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    from gguf import GGMLQuantizationType

    from kernels.gguf_gemm import GGUF_KERNEL_TYPES, gguf_gemm, gguf_linear_ref
    from tests.kernels.test_gguf_gemm import random_blocks

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float16 if args.smoke else torch.bfloat16  # bf16 tl.dot is wrong in the interpreter
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    m_values = args.m or (SMOKE_M_VALUES if args.smoke else M_VALUES)
    replays = 1 if args.smoke else args.replays
    bandwidth = copy_bandwidth(device)
    failures = []
    print(f"device={device} dtype={dtype} copy bandwidth={bandwidth / 1e9:.0f} GB/s")
    print(f"{'type':6} {'shape':22} {'N':>6} {'K':>6} {'M':>5} {'gguf us':>9} {'bf16 us':>9} {'speedup':>8} "
          f"{'floor us':>9} {'of floor':>8}")
    for type_name in args.types:
        ggml_type = int(GGMLQuantizationType[type_name])
        block, type_size = GGUF_KERNEL_TYPES[ggml_type]
        for shape_name, (n, k) in shapes.items():
            if k % block:
                continue
            raw = torch.from_numpy(random_blocks(ggml_type, n, k, seed=n + k, scale=1e-3)).to(device)
            dense = torch.randn(n, k, dtype=dtype, device=device)
            floor_us = raw.numel() / bandwidth * 1e6
            for m in m_values:
                x = torch.randn(m, k, dtype=dtype, device=device)
                out = gguf_gemm(x, raw, ggml_type)
                ref = gguf_linear_ref(x, raw, ggml_type, out_dtype=torch.float32)
                err = (out.float() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6)
                if not err < 2e-2:
                    failures.append(f"{type_name} {shape_name} M={m}: relative error {err:.3g}")
                us = time_us(lambda: gguf_gemm(x, raw, ggml_type), replays, device)
                bf16_us = time_us(lambda: F.linear(x, dense), replays, device)
                print(f"{type_name:6} {shape_name:22} {n:6} {k:6} {m:5} {us:9.1f} {bf16_us:9.1f} "
                      f"{bf16_us / us:8.2f} {floor_us:9.1f} {floor_us / us:8.2f}")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
