"""The Gluon int4 decode GEMM (kernels/int4_gemv_gluon.py) per shape and config against the Triton int4 decode
kernels' table entry, at M = 1: what fills ``INT4_GEMV_CONFIGS`` in ``kernels/int4_gemm.py``.

    python benchmarks/bench_int4_gemv.py                          # Llama-3.1-8B's four layer shapes
    python benchmarks/bench_int4_gemv.py --models llama-3.2-1b qwen3-0.6b --no-pdl

Each shape is timed in the layout the engine gives it: ``tile_int4``'s for all but qkv (whose GEMV reads the
plain layout for its rotary epilogue); ``--plain``: the plain kernel layout everywhere. Every call is checked
against ``int4_linear_ref`` first. Timing: the calls captured back to back in one CUDA graph,
each on its own copy of the weight (>= 256 MB of copies, so no call reads its weight from L2), median of
``--replays`` replays, per call; with PDL on unless ``--no-pdl`` (the engine's default). ``g{warps}x{chunks}p{n}``:
the GEMV with ``n`` steps preloaded before the PDL wait; "table": ``int4_decode_or_prefill_gemm`` with the GEMV off.
Group 128, bf16 rows. It prints each shape's times, fastest first, the floor (int4 codes + scales + zeros at
4.28 TB/s) and the block to paste. GPU only: Gluon has no interpreter.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_fp8_gemv import MODEL_SHAPES, gemv_bench_setup  # noqa: E402
from benchmarks.bench_skinny_gemm import time_per_call  # noqa: E402
from kernels import int4_gemm  # noqa: E402
from kernels.int4_gemm import (  # noqa: E402
    int4_decode_or_prefill_gemm, int4_linear_ref, pack_int4_kernel, tile_int4, tiling_supported,
)
from kernels.int4_gemv_gluon import Int4GemvConfig, gluon_int4_gemv  # noqa: E402

GROUP = 128
CONFIGS = [Int4GemvConfig(w, c, p) for w, c, p in ((4, 1, 1), (4, 1, 2), (4, 2, 1), (4, 2, 2), (4, 4, 1), (8, 1, 1),
                                                  (8, 2, 1), (8, 2, 2), (8, 4, 1), (16, 2, 1))]
ROTATE_BYTES = 256 << 20
TABLE = "table"


def label(config: Int4GemvConfig) -> str:
    return f"g{config.warps}x{config.chunks}p{config.preload}"


def time_shape(n: int, k: int, replays: int, gen: torch.Generator, tiled: bool) -> dict[str, float]:
    """Each config's (and the table's) microseconds per call at M = 1, after checking its output; ``tiled``: the
    weight in ``tile_int4``'s layout."""
    codes = torch.randint(0, 16, (k, n), device="cuda", generator=gen)
    base = (pack_int4_kernel(codes), (torch.rand(k // GROUP, n, device="cuda", generator=gen) * 0.02).to(torch.bfloat16),
            torch.randint(0, 16, (k // GROUP, n), device="cuda", generator=gen).to(torch.bfloat16))
    if tiled:
        base = tile_int4(*base)
    copies = [tuple(t.clone() for t in base) for _ in range(max(3, -(-ROTATE_BYTES // (n * k // 2))))]
    x = torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16)
    ref = int4_linear_ref(x, *base, GROUP, tiled=tiled).float()
    calls: dict[str, Callable] = {TABLE: lambda q, s, z: int4_decode_or_prefill_gemm(x, q, s, z, GROUP, tiled=tiled)}
    for config in CONFIGS:
        calls[label(config)] = lambda q, s, z, c=config: gluon_int4_gemv(x, q, s, z, GROUP, c, tiled)
    times = {}
    enabled = int4_gemm.INT4_GEMV_ENABLED
    for name, call in calls.items():
        int4_gemm.INT4_GEMV_ENABLED = name != TABLE
        try:
            out = call(*base).float()
            err = ((out - ref).norm() / ref.norm()).item()
            if err > 1e-2:
                raise AssertionError(f"relative error {err:.2e} against int4_linear_ref")
            times[name] = time_per_call([lambda c=c: call(*c) for c in copies], replays) * 1e3
        except Exception as exc:  # a config that does not compile, or a wrong result: reported, not timed
            print(f"#   {n}x{k} {name}: {type(exc).__name__}: {str(exc)[:160]}")
        finally:
            int4_gemm.INT4_GEMV_ENABLED = enabled
    return times


def main() -> int:
    setup = gemv_bench_setup(__doc__.split("\n\n")[0], "bench_int4_gemv.py", lambda parser: parser.add_argument(
        "--plain", action="store_true", help="every shape in the plain kernel layout (the engine tiles all but qkv)"))
    if setup is None:
        return 1
    opts, gen = setup
    lines = []
    for model in opts.models:
        for layer, (n, k) in MODEL_SHAPES[model].items():
            tiled = not opts.plain and layer != "qkv" and tiling_supported(n, k, GROUP)
            times = time_shape(n, k, opts.replays, gen, tiled)
            floor = (n * k / 2 + 2 * 2 * n * k / GROUP) / 4.28e12 * 1e6
            ranked = " ".join(f"{name} {t:.1f}" for name, t in sorted(times.items(), key=lambda kv: kv[1]))
            print(f"{model} {layer} ({n}, {k}, {'tiled' if tiled else 'plain'}), floor {floor:.1f} us: {ranked}",
                  flush=True)
            gemv = {name: t for name, t in times.items() if name != TABLE}
            best = min(gemv, key=gemv.get) if gemv else None
            if best is not None and (TABLE not in times or gemv[best] < times[TABLE]):
                config = next(c for c in CONFIGS if label(c) == best)
                entry = f"Int4GemvConfig({config.warps}, {config.chunks}, {config.preload})"
            else:
                entry = "None"
            lines.append(f"    ({n}, {k}): {entry},  # {model} {layer}: {gemv.get(best, float('nan')):.1f} us, "
                         f"table {times.get(TABLE, float('nan')):.1f}")
    print("# paste into INT4_GEMV_CONFIGS (kernels/int4_gemm.py):")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
