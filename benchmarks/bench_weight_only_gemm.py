"""The weight-only Triton GEMMs that serve checkpoint formats (bitsandbytes NF4 and NVFP4, bitsandbytes 8-bit and
GPTQ 8-bit) at Llama-3.1-8B's four layer shapes, against each format's weight-read floor: the byte-codes decode GEMV
(``kernels/codes_gemv.py``) at each of ``GEMV_CONFIGS`` (up to its ``GEMV_MAX_M`` rows), the weight dequantized for
one cuBLAS GEMM (``kernels/codes_dequant.py``, "dequant"), and for 8-bit the tile kernel (``kernels/int8_gemm.py``,
"tiles"), which 8-bit layers run from 2 to 16 rows.

    python -m benchmarks.bench_weight_only_gemm               # M = 1, 4, 16, 256
    python -m benchmarks.bench_weight_only_gemm --m 1 --formats nvfp4 nf4
    python -m benchmarks.bench_weight_only_gemm --smoke       # tiny shapes on CPU (Triton interpreter)

Every call is checked against its format's reference first (random codes: speed does not depend on the values).
Timing: the calls captured back to back in one CUDA graph, each on its own copy of the weight (>= 256 MB of
copies, so no call reads its weight from L2), median of ``--replays`` replays, per call. The floor is the format's
bytes (codes, scales, zero points) at 4.28 TB/s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from benchmarks.smoke import interpret_smoke_without_cuda

interpret_smoke_without_cuda()  # before kernels/ is imported

import torch  # noqa: E402

from benchmarks.bench_fp8_gemv import MODEL_SHAPES  # noqa: E402
from benchmarks.bench_skinny_gemm import time_per_call  # noqa: E402
from kernels.bnb4_gemm import E2M1_CODEBOOK, NF4_CODEBOOK, bnb4_linear_ref  # noqa: E402
from kernels.codes_dequant import codes_dequant_gemm  # noqa: E402
from kernels.codes_gemv import GEMV_MAX_M, CodesGemvConfig, codes_gemv, step_fits  # noqa: E402
from kernels.int8_gemm import int8_gemm_triton, int8_linear_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = ("nf4", "nvfp4", "int8", "gptq8")
ROTATE_BYTES = 256 << 20
SMOKE_SHAPES = {"qkv": (96, 64), "down": (64, 128)}
GEMV_CONFIGS = [CodesGemvConfig(*c) for c in ((8, 256, 1, 1), (8, 128, 1, 1), (8, 128, 2, 1), (8, 512, 1, 1),
                                              (16, 256, 1, 1), (4, 256, 1, 1), (8, 256, 2, 1))]  # fmt: skip
SMOKE_GEMV_CONFIGS = [CodesGemvConfig(8, 16, 2)]


def gemv_name(c: CodesGemvConfig) -> str:
    return f"gemv{c.block_n}x{c.block_b}w{c.num_warps}a{c.ahead}"


def codebook_of(fmt: str) -> torch.Tensor:
    return torch.tensor(NF4_CODEBOOK if fmt == "nf4" else E2M1_CODEBOOK, device=DEVICE)


def make_weight(fmt: str, n: int, k: int, gen: torch.Generator
                ) -> tuple[tuple[torch.Tensor, ...], Callable | None, Callable, Callable, Callable]:  # fmt: skip
    """A random weight of ``fmt`` as the kernel's tensors, with its tile kernel's call (8-bit; the 4-bit one was
    removed), its reference's, the dequantize-then-cuBLAS path's (each ``f(x, *tensors)``; the kernels called
    directly, so ``--smoke`` runs them in the interpreter) and ``gemv(config)``, the byte-codes GEMV's call at that
    config."""
    def rand(*size: int) -> torch.Tensor:
        return torch.rand(*size, generator=gen, device=DEVICE)

    if fmt in ("nf4", "nvfp4"):
        block = 64 if fmt == "nf4" else 16
        codebook = codebook_of(fmt)
        codes = torch.randint(0, 256, (n, k // 2), generator=gen, device=DEVICE, dtype=torch.int16).to(torch.uint8)
        absmax = rand(n, k // block) * k**-0.5 + k**-0.5 / 2
        if fmt == "nf4":
            tensors = (codes, absmax)
            return (tensors, None, lambda x, w, a: bnb4_linear_ref(x, w, a, codebook, block),
                    lambda x, w, a: codes_dequant_gemm(x, w, a, four_bit=True, group=block, codebook=codebook),
                    lambda c: lambda x, w, a: codes_gemv(x, w, a, four_bit=True, group=block, codebook=codebook,
                                                         config=c))
        row = absmax.amax(-1) / 448
        tensors = (codes, (absmax / row[:, None]).to(torch.float8_e4m3fn), row / 6)
        return (tensors, None, lambda x, w, a, r: bnb4_linear_ref(x, w, a, codebook, block, row_scale=r),
                lambda x, w, a, r: codes_dequant_gemm(x, w, a, four_bit=True, group=block, codebook=codebook,
                                                      row_scale=r),
                lambda c: lambda x, w, a, r: codes_gemv(x, w, a, four_bit=True, group=block, codebook=codebook,
                                                        row_scale=r, config=c))  # fmt: skip
    if fmt == "int8":
        codes = torch.randint(-127, 128, (n, k), generator=gen, device=DEVICE, dtype=torch.int16).to(torch.int8)
        tensors = (codes, rand(n) * k**-0.5 / 64)
        return (tensors, lambda x, w, s: int8_gemm_triton(x, w, s), lambda x, w, s: int8_linear_ref(x, w, s),
                lambda x, w, s: codes_dequant_gemm(x, w, s, four_bit=False, group=0),
                lambda c: lambda x, w, s: codes_gemv(x, w, s, four_bit=False, group=0, config=c))
    group = min(128, k)
    codes = torch.randint(0, 256, (n, k), generator=gen, device=DEVICE, dtype=torch.int16).to(torch.uint8)
    tensors = (codes, rand(n, k // group) * k**-0.5 / 64, torch.full((n, k // group), 128.0, device=DEVICE))
    return (tensors, lambda x, w, s, z: int8_gemm_triton(x, w, s, z, group),
            lambda x, w, s, z: int8_linear_ref(x, w, s, zeros=z, group=group),
            lambda x, w, s, z: codes_dequant_gemm(x, w, s, four_bit=False, group=group, zeros=z),
            lambda c: lambda x, w, s, z: codes_gemv(x, w, s, four_bit=False, group=group, zeros=z,
                                                    config=c))  # fmt: skip


def bench_shape(fmt: str, n: int, k: int, ms: list[int], replays: int, gen: torch.Generator, dtype: torch.dtype,
                gemv_configs: list[CodesGemvConfig], gemv_max_m: int = GEMV_MAX_M) -> list[str]:  # fmt: skip
    """One line per M: the dequantize path's, the tile kernel's (8-bit) and each GEMV config's (up to ``gemv_max_m``
    rows: the dispatch's ``GEMV_MAX_M`` unless asked for more) microseconds per call, fastest first, and the
    format's floor (its bytes at 4.28 TB/s)."""
    tensors, tiles, reference, dequant, gemv = make_weight(fmt, n, k, gen)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    copies = [tuple(t.clone() for t in tensors) for _ in range(max(2, -(-ROTATE_BYTES // nbytes)))]
    if DEVICE == "cpu":
        copies = copies[:1]
    floor = nbytes / 4.28e12 * 1e6
    lines = []
    for m in ms:
        x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
        ref = reference(x, *tensors).float()
        calls = {"dequant": dequant} if tiles is None else {"tiles": tiles, "dequant": dequant}
        if m <= gemv_max_m:
            four_bit, group = fmt in ("nf4", "nvfp4"), min(128, k) if fmt == "gptq8" else 0
            fitting = [c for c in gemv_configs if step_fits(c.block_b, k // 2 if four_bit else k, four_bit, group)]
            calls.update({gemv_name(c): gemv(c) for c in fitting})
        times = {}
        for name, call in calls.items():
            out = call(x, *tensors).float()
            err = ((out - ref).norm() / ref.norm()).item()
            if err > 2e-2:
                raise AssertionError(f"{fmt} {n}x{k} M={m} {name}: relative error {err:.2e} against its reference")
            times[name] = time_per_call([lambda c=c, f=call: f(x, *c) for c in copies], replays) * 1e3
        ranked = " ".join(f"{name} {t:.1f}" for name, t in sorted(times.items(), key=lambda kv: kv[1]))
        lines.append(f"{fmt} ({n}, {k}) M={m}: floor {floor:.1f} us: {ranked}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 256])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--gemv-configs", type=int, default=len(GEMV_CONFIGS), help="time the first N GEMV configs")
    parser.add_argument("--gemv-max-m", type=int, default=GEMV_MAX_M,
                        help="time the GEMV up to this many rows (the dispatch takes it up to GEMV_MAX_M)")
    opts = parser.parse_args(argv)
    if DEVICE != "cuda" and not opts.smoke:
        print("bench_weight_only_gemm needs a CUDA GPU; --smoke runs on CPU (interpreter)", file=sys.stderr)
        return 2
    shapes = SMOKE_SHAPES if opts.smoke else MODEL_SHAPES["llama-3.1-8b"]
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for fmt in opts.formats:
        for layer, (n, k) in shapes.items():
            configs = SMOKE_GEMV_CONFIGS if opts.smoke else GEMV_CONFIGS[:opts.gemv_configs]
            for line in bench_shape(fmt, n, k, opts.m, opts.replays, gen, dtype, configs, opts.gemv_max_m):
                print(f"{layer} {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
