"""Quantized GEMMs at Llama-3.1-8B's linear shapes: bf16 (cuBLAS and the skinny dispatcher) against fp8 (the
skinny w8a16 Triton kernels, and per-token quantization + ``torch._scaled_mm``) and int4 (the Triton w4a16 kernels,
group 128), per M, in microseconds per call and as a fraction of each format's weight-read floor (weight bytes /
the measured device copy bandwidth). Every kernel is checked against its reference first.

This is what picks the fp8 path per shape (``kernels/fp8_linear.py: SKINNY_MAX_M``) and shows what W3 at fp8 / int4
can reach: at M = 1 a decode step is these four GEMMs per layer.

    python benchmarks/bench_quant_gemm.py            # on the GPU: every kernel at M = 1 .. 4096
    python benchmarks/bench_quant_gemm.py --sweep    # decode (M = 1, 2, 4) fma + mma config sweep on the H200
    python benchmarks/bench_quant_gemm.py --sweep --m 1   # M = 1 only (W3's decode step)
    python benchmarks/bench_quant_gemm.py --smoke [--sweep]   # tiny shapes on CPU (Triton interpreter)
    python benchmarks/bench_quant_gemm.py --sweep-dot --m 1 4 16   # + every tl.dot decode launch config
    python benchmarks/bench_quant_gemm.py --formats int4 --m 16 32 64 128 256 1024   # int4's dequant crossover
    python benchmarks/bench_quant_gemm.py --sweep --m 1 --split-k 1 2 4 8   # + fixed K splits of the mma configs

``--sweep`` times the CUDA-core fma kernels (``fp8_fma_gemm``, ``int4_fma_gemm``) at each candidate config for
M = 1, 2, 4 (``--m`` up to 16: fma configs run to M = 4), fp8 also the W8A8 tensor-core kernel's ``mma`` configs
(``fp8_mma_gemm``: activation quantization included) and per-token quantization + ``torch._scaled_mm`` with x padded
to 16 rows (timed beside; not a table kind), at the four layer shapes (the LM head stays bf16 under fp8 and AWQ: timed as the bf16 skinny kernel for
the step total), beside the current tl.dot kernels and the bf16 skinny kernel, each call on its own copy of the
weight (copies >= 128 MB in all, so nothing is served from the 50 MB L2). It prints per (format, shape, M) the best
config, us, GB/s and % of 4.28 TB/s (H200 HBM3e peak), a config block to paste into ``FP8_SKINNY_CONFIGS`` /
``FP8_DEFAULT_CONFIGS`` and ``INT4_SKINNY_CONFIGS`` / ``INT4_DEFAULT_CONFIGS`` (int4 candidates: the fma kernel's
and the w4a16 tensor-core kernel's ``mma`` / ``mms`` configs, ``int4_mma_gemm``, checked against
``int4_linear_ref``), and the predicted GEMM time of one
W3 decode step (32 layers x 4 GEMMs + the bf16 LM head). ``--sweep-dot`` is the older sweep of the tl.dot kernels'
block_n x block_k x split_k x num_warps.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    p.add_argument("--sweep", action="store_true", help="sweep the fma decode kernels' configs at M = 1, 2, 4 (only)")
    p.add_argument("--sweep-dot", action="store_true", help="also sweep the tl.dot decode kernels' launch configs")
    p.add_argument("--split-k", type=int, nargs="+", default=[], metavar="S",
                   help="--sweep: also time each tensor-core candidate at these fixed K splits (label suffix :kS)")
    p.add_argument("--formats", nargs="+", choices=("fp8", "int4"), default=["fp8", "int4"],
                   help="--sweep: the quantized formats to sweep (bf16 skinny always runs, as the yardstick)")
    return p.parse_args()


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cpu" if ARGS.smoke else "cuda"
DTYPE = torch.float16 if ARGS.smoke else torch.bfloat16  # bf16 tl.dot is wrong in the interpreter

from kernels import fp8_linear as fp8  # noqa: E402  (after TRITON_INTERPRET is set)
from kernels import int4_gemm as i4  # noqa: E402
from kernels.int4_gemm import int4_gemm, int4_linear_ref, pack_int4_kernel  # noqa: E402
from kernels.skinny_gemm import SkinnyConfig, m_bucket  # noqa: E402
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
        formats["int4"].append((pack_int4_kernel(q4).to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE)))
    return formats


def candidates(m: int, weights: dict[str, list]) -> dict[str, tuple[Callable, str]]:
    """name -> (call on copy i and x, the weight format it reads)."""
    runs = {"cublas bf16": (lambda i, x: F.linear(x, weights["bf16"][i]), "bf16")}
    if m <= 16 and DEVICE == "cuda":
        runs["skinny bf16"] = (lambda i, x: skinny_linear(x, weights["bf16"][i]), "bf16")
    if m <= fp8.SKINNY_MAX_M:
        runs["fp8 skinny (w8a16)"] = (lambda i, x: fp8.fp8_skinny_gemm(x, *weights["fp8"][i]), "fp8")
        runs["fp8 decode dispatch"] = (lambda i, x: fp8.fp8_decode_gemm(x, *weights["fp8"][i]), "fp8")
    if DEVICE == "cuda" and fp8.fp8_supported(torch.device(DEVICE)):
        runs["fp8 quant+_scaled_mm"] = (lambda i, x: _scaled_mm_path(x, *weights["fp8"][i]), "fp8")
    runs["int4 triton (w4a16)"] = (lambda i, x: int4_gemm(x, *weights["int4"][i], GROUP), "int4")
    runs["int4 dispatch"] = (lambda i, x: i4.int4_decode_or_prefill_gemm(x, *weights["int4"][i], GROUP), "int4")
    runs["int4 dequant+cuBLAS"] = (lambda i, x: i4.int4_dequant_gemm(x, *weights["int4"][i], GROUP), "int4")
    return runs


def _scaled_mm_path(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xq, x_scale = fp8.quantize_activations_triton(x)
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.reshape(1, -1), out_dtype=torch.bfloat16)


def references(x: torch.Tensor, weights: dict[str, list]) -> dict[str, torch.Tensor]:
    q8, s8 = weights["fp8"][0]
    return {"bf16": x.float() @ weights["bf16"][0].float().T,
            "fp8 skinny (w8a16)": fp8.fp8_weight_only_ref(x, q8, s8).float(),
            "fp8 decode dispatch": fp8.fp8_weight_only_ref(x, q8, s8).float(),
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


# ------------------------------------------------------------------------------------- --sweep: the fma decode kernels

HBM_PEAK = 4.28e12  # H200 HBM3e, bytes/s: the % column's denominator (the brief's floor)
LAYERS = 32  # Llama-3.1-8B
LM_HEAD = (128256, 4096)  # stays bf16 under fp8 and AWQ: timed as the bf16 skinny kernel
ROTATE_BYTES = 128 << 20  # weight copies per shape, in all: >= 2.5x the H200's 50 MB L2
DECODE_M = (1, 2, 4)
# Candidates per format (all M buckets): 16-byte loads, so fp8 tiles hold >= 16 weights per thread
# (block_n * block_k / (32 * warps)) and int4 tiles >= 4 words; up to 64 weights / 16 words, where the M fp32
# accumulator tiles (fp8: one register per weight; int4: one per word) still fit ~128-168 registers.
FP8_CANDIDATES = ["fma:2x1024:w4:p0", "fma:4x512:w4:p0", "fma:4x1024:w4:p0", "fma:8x512:w4:p0", "fma:2x2048:w4:p0",
                  "fma:8x1024:w4:p0", "fma:4x2048:w4:p0", "fma:4x1024:w8:p0", "fma:8x1024:w8:p0",
                  "fma:4x2048:w8:p0", "fma:16x512:w8:p0", "fma:8x2048:w8:p0",
                  # a whole 4096-wide row in one tile: every load of a program issued before its first FMA
                  "fma:1x2048:w4:p0", "fma:1x4096:w4:p0", "fma:2x4096:w4:p0", "fma:4x4096:w8:p0"]  # fmt: skip
FP8_PREFETCH = (2, 4)  # tried on each (shape, M)'s best config
# W8A8 tensor-core kernel (per-token activation quantization + fp8 wgmma; split K by tensor_core_split_k): weight
# tiles of 64 / 128 rows (one / two wgmma M-tiles) and 128-512 bytes of K, pipeline depth 2-5; any M <= 16.
# mmq: the same kernel quantizing the activations itself (one launch less, more instructions per tile).
FP8_MMA_CANDIDATES = ["mma:64x128:w4:s4", "mma:64x256:w4:s3", "mma:64x256:w4:s5", "mma:64x512:w4:s3",
                      "mma:128x128:w4:s4", "mma:128x256:w4:s3", "mma:128x256:w8:s4", "mma:128x512:w8:s2",
                      "mmq:64x256:w4:s3", "mmq:64x512:w4:s3", "mmq:128x256:w4:s3", "mmq:128x256:w8:s4"]  # fmt: skip
# Stream-K W8A8 (kernels/fp8_stream_k.py): one persistent launch, 1-3 programs per SM splitting the weight's tiles
FP8_STREAM_K_CANDIDATES = [f"msk:{tile}:w4:s{stages}:g{per_sm}" for tile in ("64x256", "128x128", "128x256")
                           for stages in (3, 4, 6) for per_sm in (1, 2, 3)]  # fmt: skip
SCALED_MM_LABEL = "_scaled_mm (x padded to 16)"  # timed beside, not a table kind (cuBLASLt picks its own tiles)
INT4_CANDIDATES = ["fma:4x1024:w4:p0", "fma:8x1024:w4:p0", "fma:16x1024:w4:p0", "fma:8x2048:w4:p0",
                   "fma:4x2048:w4:p0", "fma:2x2048:w4:p0", "fma:8x512:w4:p0", "fma:16x512:w4:p0",
                   "fma:8x1024:w8:p0", "fma:16x1024:w8:p0", "fma:8x2048:w8:p0", "fma:4x4096:w8:p0"]  # fmt: skip
# Per thread and tile: fp8 weights (= accumulator registers per x row), int4 words; above these, compiling for
# sm_90 spilled registers (fp8 M = 4 at 64 weights: ~320 spill stores; int4 M = 4 at 16 words).
MAX_PER_THREAD = {("fp8", 1): 64, ("fp8", 2): 64, ("fp8", 4): 32, ("int4", 1): 16, ("int4", 2): 16, ("int4", 4): 8}
# int4 tensor-core kernel (``int4_mma_gemm``, w4a16, any M <= 16, split K by decode_launch at the config's block_n):
# weight tiles of 64 / 128 / 256 rows (one to four wgmma M-tiles) and 128-512 rows of K (tiles spanning groups
# broadcast their scales), pipeline depth 2-5. ``mms``: the products scaled per tile instead of the weights (tiles
# within a group: block_k <= 128), ~11% fewer loop instructions (benchmarks/int4_gemm_sass.py).
INT4_MMA_CANDIDATES = ["mma:64x128:w4:s4", "mma:64x128:w4:s5", "mma:64x256:w4:s3", "mma:64x512:w4:s2",
                       "mma:128x128:w4:s3", "mma:128x128:w4:s4", "mma:128x256:w4:s3", "mma:128x128:w8:s4",
                       "mma:128x256:w8:s3", "mma:128x512:w8:s2", "mma:256x128:w8:s3", "mma:256x256:w8:s2",
                       "mms:64x128:w4:s4", "mms:64x128:w4:s5", "mms:128x64:w4:s4", "mms:128x128:w4:s3",
                       "mms:128x128:w4:s4", "mms:128x128:w8:s3", "mms:256x128:w8:s3"]  # fmt: skip
SMOKE_FP8_CANDIDATES = ["fma:4x64:w1:p0", "fma:2x128:w2:p0"]
SMOKE_FP8_MMA_CANDIDATES = ["mma:64x64:w4:s1", "mmq:64x64:w4:s1", "msk:64x64:w4:s1:g1"]
SMOKE_INT4_CANDIDATES = ["fma:4x64:w1:p0", "fma:2x128:w2:p0"]
SMOKE_INT4_MMA_CANDIDATES = ["mma:64x128:w4:s1", "mma:64x256:w4:s1", "mms:64x64:w4:s1"]  # 1 / 2 / 0.5 groups a tile


def format_bytes(fmt: str, n: int, k: int) -> int:
    """Bytes one call must read: the weight and its scales (fp32 per channel; int4: bf16 scales + zeros per group)."""
    if fmt == "bf16":
        return n * k * 2
    if fmt == "fp8":
        return n * k + n * 4
    return n * k // 2 + 2 * (k // GROUP) * n * 2


def sweep_weights(fmt: str, n: int, k: int, gen: torch.Generator) -> list:
    """Enough copies of one shape's weight in ``fmt`` to cover ROTATE_BYTES, made on the device."""
    copies = 1 if DEVICE == "cpu" else max(2, -(-ROTATE_BYTES // format_bytes(fmt, n, k)))
    out = []
    for _ in range(copies):
        if fmt == "int4":
            q4 = torch.randint(0, 16, (k, n), generator=gen, device=DEVICE)
            scales = (torch.rand(k // GROUP, n, generator=gen, device=DEVICE) * 0.004 + 0.001).to(DTYPE)
            zeros = torch.randint(0, 16, (k // GROUP, n), generator=gen, device=DEVICE).to(DTYPE)
            out.append((pack_int4_kernel(q4), scales, zeros))
            continue
        w = (torch.randn(n, k, generator=gen, device=DEVICE) * 0.02).to(DTYPE)
        out.append(w if fmt == "bf16" else fp8.quantize_per_channel(w.float()))
    return out


def sweep_calls(fmt: str, weights: list, k: int, out_dtype: torch.dtype | None = None) -> dict[str, Callable]:
    """label -> call(copy i, x): the current kernel, then every fma candidate that fits this K (bf16: the skinny
    dispatcher, in ``out_dtype``: the LM head's logits are fp32); fp8 also the W8A8 ``mma`` candidates and, on an
    fp8 GPU, per-token quantization + ``torch._scaled_mm`` with x padded to 16 rows."""
    if fmt == "bf16":
        return {"bf16 skinny": lambda i, x: skinny_linear(x, weights[i], out_dtype=out_dtype)}
    if fmt == "fp8":
        calls = {"current (tl.dot)": lambda i, x: fp8.fp8_skinny_gemm(x, *weights[i])}
        for text in SMOKE_FP8_CANDIDATES if ARGS.smoke else FP8_CANDIDATES:
            config = SkinnyConfig.parse(text)
            calls[text] = lambda i, x, c=config: fp8.fp8_fma_gemm(x, *weights[i], c)
        texts = SMOKE_FP8_MMA_CANDIDATES if ARGS.smoke else FP8_MMA_CANDIDATES + FP8_STREAM_K_CANDIDATES
        for config in with_splits(texts, k):
            calls[str(config)] = lambda i, x, c=config: fp8.fp8_mma_gemm(x, *weights[i], c)
        if DEVICE == "cuda" and fp8.fp8_supported(torch.device(DEVICE)):
            calls[SCALED_MM_LABEL] = lambda i, x: _scaled_mm_padded(x, *weights[i])
        return calls
    calls = {"current (tl.dot)": lambda i, x: int4_gemm(x, *weights[i], GROUP)}
    for text in SMOKE_INT4_CANDIDATES if ARGS.smoke else INT4_CANDIDATES:
        config = SkinnyConfig.parse(text)
        if i4._fit_block_k(config, k, GROUP) == config:  # block_k divides K (14336 = 7 * 2048)
            calls[text] = lambda i, x, c=config: i4.int4_fma_gemm(x, *weights[i], GROUP, c)
    for config in with_splits(SMOKE_INT4_MMA_CANDIDATES if ARGS.smoke else INT4_MMA_CANDIDATES, k):
        if i4._fit_block_k(config, k, GROUP) == config:
            calls[str(config)] = lambda i, x, c=config: i4.int4_mma_gemm(x, *weights[i], GROUP, c)
    return calls


def with_splits(texts: list[str], k: int) -> list[SkinnyConfig]:
    """The tensor-core candidates, each also at every ``--split-k`` value its K has tiles for (``:kS`` configs)."""
    configs = []
    for text in texts:
        config = SkinnyConfig.parse(text)
        configs.append(config)
        if config.kind == "msk":  # no K split: the stream-K launch divides K itself
            continue
        configs += [dataclasses.replace(config, split_k=s) for s in ARGS.split_k if 1 <= s <= k // config.block_k]
    return configs


def _scaled_mm_padded(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8 through cuBLASLt at decode M: x zero-padded to 16 rows (the row-wise-scaled fp8 GEMM wants M % 16 == 0
    for its fast kernels), quantized per token, ``torch._scaled_mm``, the real rows out."""
    m = x.shape[0]
    padded = F.pad(x, (0, 0, 0, 16 - m)) if m < 16 else x
    return _scaled_mm_path(padded, weight, scale)[:m]


def runs_at(fmt: str, label: str, m: int) -> bool:
    """Whether a sweep candidate runs at this M: fma only up to M = 4 and within its register budget."""
    if label.startswith("fma") and m > fp8.FMA_MAX_M:
        return False
    return fits_registers(fmt, label, m)


def fits_registers(fmt: str, label: str, m: int) -> bool:
    """False for an fma candidate whose per-thread tile would spill at this M (see MAX_PER_THREAD)."""
    if not label.startswith("fma") or ARGS.smoke:
        return True
    c = SkinnyConfig.parse(label)
    per_thread = c.block_n * c.block_k // (32 * c.num_warps) // (8 if fmt == "int4" else 1)
    return per_thread <= MAX_PER_THREAD[(fmt, m_bucket(m))]


def sweep_reference(fmt: str, weights: list, x: torch.Tensor, label: str = "") -> torch.Tensor:
    """The reference of one sweep call: W8A8 (``fp8_linear_ref``) for the ``mma`` and ``_scaled_mm`` calls, else the
    format's weight-only reference."""
    if fmt == "fp8" and (label.startswith(fp8.MMA_KINDS) or label == SCALED_MM_LABEL):
        if ARGS.smoke:  # the interpreter's fp32 -> e4m3 cast is not the GPU's (tests/kernels/test_fp8_linear.py):
            xq, x_scale = fp8.quantize_activations_triton(x)  # dequantize its own activations
            return (xq.float() * x_scale) @ (weights[0][0].float() * weights[0][1][:, None]).T
        return fp8.fp8_linear_ref(x, *weights[0]).float()
    if fmt == "bf16":
        return x.float() @ weights[0].float().T
    if fmt == "fp8":
        return fp8.fp8_weight_only_ref(x, *weights[0]).float()
    return int4_linear_ref(x, *weights[0], GROUP).float()


def precompile(jobs: list[tuple[Callable, torch.Tensor]]) -> None:
    """Run one call per (kernel specialization) in parallel threads first: ptxas is a subprocess and Triton's passes
    release the GIL, so the sweep's compile time is divided by the threads. Failures surface in the timed run."""
    from concurrent.futures import ThreadPoolExecutor

    def run(job: tuple[Callable, torch.Tensor]) -> None:
        try:
            job[0](0, job[1])
        except Exception:  # noqa: BLE001  (reported by the timed run)
            pass

    start = time.perf_counter()
    if jobs:
        run(jobs[0])
    workers = 1 if DEVICE == "cpu" else min(16, os.cpu_count() or 4)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, jobs[1:]))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print(f"# precompiled {len(jobs)} calls in {time.perf_counter() - start:.1f} s ({workers} threads)")


def decode_sweep() -> int:
    """The --sweep section (see the module docstring)."""
    start = time.perf_counter()
    shapes = {"tiny_b": SMOKE_SHAPES["tiny_b"]} if ARGS.smoke else SHAPES
    m_values = ARGS.m or ((1, 4) if ARGS.smoke else DECODE_M)
    if any(m > fp8.SKINNY_MAX_M for m in m_values):
        print(f"# --sweep times the decode kernels, M <= {fp8.SKINNY_MAX_M} (fma: M <= 4); larger M are left out")
        m_values = [m for m in m_values if m <= fp8.SKINNY_MAX_M]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    print(f"# device {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu (interpreter)'}, {DTYPE}, "
          f"% of {HBM_PEAK / 1e12:.2f} TB/s, int4 group {GROUP}")
    # results[(fmt, shape, m)] = {label: ms}
    results: dict[tuple[str, str, int], dict[str, float]] = {}
    timed_shapes = dict(shapes)
    if not ARGS.smoke:
        timed_shapes["lm_head"] = LM_HEAD
    for name, (n, k) in timed_shapes.items():
        for fmt in ("bf16", *ARGS.formats) if name != "lm_head" else ("bf16",):
            weights = sweep_weights(fmt, n, k, gen)
            calls = sweep_calls(fmt, weights, k, torch.float32 if name == "lm_head" else None)
            xs = {m: torch.randn(m, k, generator=gen, device=DEVICE).to(DTYPE) for m in m_values}
            # one small-N slice per kernel specialization (M bucket x config) to compile in parallel
            precompile([(call, xs[m]) for m in m_values for label, call in calls.items()
                        if runs_at(fmt, label, m)] if name == next(iter(shapes)) else [])
            for m in m_values:
                x = xs[m]
                refs: dict[bool, torch.Tensor] = {}
                times: dict[str, float] = {}
                for label, call in calls.items():
                    if not runs_at(fmt, label, m):
                        continue
                    w8a8 = label.startswith(fp8.MMA_KINDS) or label == SCALED_MM_LABEL
                    if w8a8 not in refs:
                        refs[w8a8] = sweep_reference(fmt, weights, x, label)
                    try:
                        check(f"{fmt} {name} M={m} {label}", call(0, x), refs[w8a8], 2e-2)
                        times[label] = time_per_call([lambda i=i: call(i, x) for i in range(len(weights))])
                    except Exception as exc:  # a config that does not compile (registers, shared memory)
                        print(f"#   {fmt} {name} M={m} {label}: {type(exc).__name__}: {str(exc)[:160]}")
                if fmt == "fp8" and not ARGS.smoke and _best_fma(times):  # L2 prefetch depths on the best config
                    for depth in FP8_PREFETCH:
                        c = SkinnyConfig.parse(_best_fma(times)[0])
                        text = str(SkinnyConfig("fma", c.block_n, c.block_k, c.num_warps, prefetch=depth))
                        config = SkinnyConfig.parse(text)
                        call = lambda i, x, c=config: fp8.fp8_fma_gemm(x, *weights[i], c)  # noqa: E731
                        try:
                            check(f"fp8 {name} M={m} {text}", call(0, x), refs[False], 2e-2)
                            times[text] = time_per_call([lambda i=i: call(i, x) for i in range(len(weights))])
                        except Exception as exc:
                            print(f"#   fp8 {name} M={m} {text}: {type(exc).__name__}: {str(exc)[:160]}")
                results[(fmt, name, m)] = times
            del weights
    print(f"# sweep timed in {time.perf_counter() - start:.0f} s")
    print_sweep(results, shapes, m_values)
    if failures:
        print("# correctness check FAILURES:\n" + "\n".join(failures))
        return 1
    print("# all correctness checks passed")
    return 0


def split_lines(times: dict[str, float]) -> list[str]:
    """With ``--split-k``: per tensor-core kind, its best config's time at the default split rule and at each fixed
    split, so a sweep shows what the splits buy."""
    lines = []
    for kind in ("mma", "mmq", "mms") if ARGS.split_k else ():
        base = {label: ms for label, ms in times.items() if label.startswith(kind) and ":k" not in label}
        if not base:
            continue
        best = min(base, key=base.get)
        parts = [f"rule {base[best] * 1e3:.1f} us"]
        parts += [f"k{s} {times[f'{best}:k{s}'] * 1e3:.1f} us" for s in ARGS.split_k if f"{best}:k{s}" in times]
        lines.append(f"{best} by K split: " + ", ".join(parts))
    return lines


def _best_fma(times: dict[str, float], kinds: tuple[str, ...] = ("fma",)) -> tuple[str, float] | None:
    fma = [(ms, label) for label, ms in times.items() if label.startswith(kinds)]
    return (min(fma)[1], min(fma)[0]) if fma else None


TABLE_KINDS = ("fma", "mma", "mmq", "mms", "msk")  # what a config table entry can name (mmq: fp8 only, mms: int4 only)


def print_sweep(results: dict, shapes: dict[str, tuple[int, int]], m_values: list[int]) -> None:
    def rate(fmt: str, n: int, k: int, ms: float) -> str:
        bps = format_bytes(fmt, n, k) / (ms * 1e-3)
        return f"{ms * 1e3:7.1f} us {bps / 1e9:6.0f} GB/s {bps / HBM_PEAK:4.0%}"

    picks: dict[tuple[str, str, int], str | None] = {}
    for fmt in ARGS.formats:
        print(f"\n## {fmt}: best table config (fma / mma / mmq) per (shape, M) against the current tl.dot kernel and bf16"
              " skinny" + ("; best fma, best mma / mmq (W8A8) and _scaled_mm with x padded to 16 beside" if fmt == "fp8"
                           else "; best fma, best mma / mms (w4a16 tensor cores) beside"))  # fmt: skip
        for name, (n, k) in shapes.items():
            for m in m_values:
                times = results.get((fmt, name, m), {})
                best = _best_fma(times, TABLE_KINDS)
                current = times.get("current (tl.dot)")
                bf16 = results.get(("bf16", name, m), {}).get("bf16 skinny")
                if best is None:
                    print(f"{name:>13} M={m}: no fma / mma config ran")
                    continue
                label, ms = best
                picks[(fmt, name, m)] = label if current is None or ms < current else None
                cur = f"current {rate(fmt, n, k, current)}" if current else "current -"
                ref = f"bf16 skinny {rate('bf16', n, k, bf16)}" if bf16 else "bf16 -"
                print(f"{name:>13} M={m} {label:>18} {rate(fmt, n, k, ms)} | {cur} | {ref}")
                if fmt in ("fp8", "int4"):
                    side = [f"{kind} {b[0]} {rate(fmt, n, k, b[1])}" for kind in TABLE_KINDS
                            if (b := _best_fma(times, (kind,)))]  # fmt: skip
                    if SCALED_MM_LABEL in times:
                        side.append(f"{SCALED_MM_LABEL} {rate(fmt, n, k, times[SCALED_MM_LABEL])}")
                    print(f"{'':>13}       " + " | ".join(side))
                    for line in split_lines(times):
                        print(f"{'':>13}       {line}")

    for fmt, table, defaults in (("fp8", "FP8_SKINNY_CONFIGS", "FP8_DEFAULT_CONFIGS"),
                                 ("int4", "INT4_SKINNY_CONFIGS", "INT4_DEFAULT_CONFIGS")):
        if fmt not in ARGS.formats:
            continue
        module = "kernels/fp8_linear.py" if fmt == "fp8" else "kernels/int4_gemm.py"
        print(f"\n## paste into {module} (measured on this device)")
        print(f"{table}: dict[tuple[int, int, int], SkinnyConfig | None] = {{")
        for name, (n, k) in shapes.items():
            for m in m_values:
                if (fmt, name, m) not in picks:
                    continue
                pick, times = picks[(fmt, name, m)], results[(fmt, name, m)]
                parts = [f"{kind} {b[1] * 1e3:.1f} us" for kind in TABLE_KINDS if (b := _best_fma(times, (kind,)))]
                cur = times.get("current (tl.dot)")
                parts += [f"tl.dot {cur * 1e3:.1f} us"] if cur else []
                pad = times.get(SCALED_MM_LABEL)
                parts += [f"_scaled_mm pad16 {pad * 1e3:.1f} us"] if pad else []
                note = f"{name}: " + ", ".join(parts)
                print(f"    ({m}, {n}, {k}): {f'_c({pick!r})' if pick else 'None'},  # {note}")
        print("}")
        print(f"{defaults}: dict[int, SkinnyConfig | None] = {{")
        for m in m_values:  # the config with the best geometric mean over the shapes it ran on
            per_config: dict[str, list[float]] = {}
            for name in shapes:
                for label, ms in results.get((fmt, name, m), {}).items():
                    if label.startswith(TABLE_KINDS):
                        per_config.setdefault(label, []).append(ms)
            full = {lbl: v for lbl, v in per_config.items() if len(v) == len(shapes)}
            if full:
                geo = {lbl: statistics.geometric_mean(v) for lbl, v in full.items()}
                label = min(geo, key=geo.get)
                print(f"    {m}: _c({label!r}),  # geo-mean over the layer shapes {geo[label] * 1e3:.1f} us")
        print("}")

    print(f"\n## predicted W3 decode step, GEMMs only: {LAYERS} x (qkv + o + gate_up + down) + bf16 LM head")
    for m in m_values:
        head = results.get(("bf16", "lm_head", m), {}).get("bf16 skinny", 0.0)
        line = [f"M={m}: LM head (bf16) {head * 1e3:.0f} us"]
        for fmt in ("bf16", "fp8", "int4"):
            for which in (("current (tl.dot)", "best") if fmt != "bf16" else ("bf16 skinny",)):
                total = 0.0
                for name in shapes:
                    times = results.get((fmt, name, m), {})
                    if which == "best":  # what the dispatcher runs once the pasted table is in
                        runnable = [ms for label, ms in times.items() if label != SCALED_MM_LABEL]
                        total += min(runnable) if runnable else float("nan")
                    else:
                        total += times.get(which, float("nan"))
                step = LAYERS * total + head
                tag = "bf16 skinny" if fmt == "bf16" else f"{fmt} {'tl.dot now' if which != 'best' else 'tuned'}"
                line.append(f"{tag} {step:.2f} ms ({m / step * 1e3:.0f} tok/s GEMM-bound)")
        print("  " + " | ".join(line))


def main() -> int:
    if ARGS.sweep:
        return decode_sweep()
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
            if ARGS.sweep_dot and m <= 16:
                sweep(name, m, x, weights)
        del weights
    if failures:
        print("# correctness check FAILURES:\n" + "\n".join(failures))
        return 1
    print("# all correctness checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
