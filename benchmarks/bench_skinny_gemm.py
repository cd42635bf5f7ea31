"""Skinny GEMM (decode-sized linear layers): cuBLAS against the Triton kernels of kernels/skinny_gemm.py, at
Llama-3.1-8B's five GEMM shapes and M in {1, 2, 4, 8, 16}, then a whole decode step's GEMMs in one CUDA graph.
Run from the repository root on the H100 (well under 2 minutes from a cold Triton cache):

    python benchmarks/bench_skinny_gemm.py            # the sweep, the whole-step lines, the table to paste
    python benchmarks/bench_skinny_gemm.py --quick    # M in {1, 16}, fewer configs
    python benchmarks/bench_skinny_gemm.py --smoke    # tiny shapes; checks the script itself, also on CPU

Method: each (shape, M, implementation) is captured as one CUDA graph of R calls, each on a different copy of the
weight (R copies >= 8x the L2 size, so every call reads its weight from HBM, as in the model, where 16 GB of weights
never sit in L2); the time per call is the median replay time / R, so the launch gaps inside a graph are counted,
as in the engine's decode graphs. GB/s counts the bytes that must move (weight + x + output) over the 3.02 TB/s
device-to-device copy ceiling (bytes read + written; also measured here). Every configuration's output is checked
against a float64 reference (NaN-poisoned output buffer, random inputs).

The last lines printed: the best configuration per (M, shape), a ``SKINNY_CONFIGS`` / ``DEFAULT_CONFIGS`` block to
paste into kernels/skinny_gemm.py, and the whole-step lines (the 32 layers' 4 GEMMs + the LM head back to back in
one graph, and the same with the RMSNorm / SiLU-and-mul kernels between them), cuBLAS against the tuned Triton
path, with and without programmatic dependent launch. Exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.smoke import interpret_smoke_without_cuda  # noqa: E402

interpret_smoke_without_cuda()  # before kernels/ is imported

import torch  # noqa: E402

from kernels import skinny_gemm as sg  # noqa: E402
from kernels.activation import silu_and_mul  # noqa: E402
from kernels.rmsnorm import rms_norm  # noqa: E402
from kernels.skinny_gemm import SkinnyConfig, linear_ref, skinny_gemm  # noqa: E402

PEAK_BYTES_PER_S = 3.02e12  # H100 device-to-device copy, bytes read + written (../shared/BENCHMARKS.md)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUBLAS = "cuBLAS"

FMA_1 = ["fma:8x512:w4:p0", "fma:16x256:w4:p0", "fma:16x512:w8:p0", "fma:4x1024:w4:p0", "fma:8x1024:w8:p0",
         "fma:8x256:w2:p0", "fma:32x256:w8:p0", "fma:8x512:w4:p4", "fma:16x256:w4:p4"]  # fmt: skip
# M = 2 and 4 keep 2 and 4 fp32 accumulator tiles per thread: smaller tiles per thread (more warps) keep the
# register count near 128 (at 4 rows, fma:8x512:w4 needs ~220 registers: 2 programs per SM).
FMA_2 = ["fma:8x512:w4:p0", "fma:8x512:w8:p0", "fma:16x256:w4:p0", "fma:4x1024:w4:p0", "fma:8x256:w4:p0",
         "fma:8x256:w4:p4"]  # fmt: skip
FMA_4 = ["fma:8x512:w8:p0", "fma:8x256:w4:p0", "fma:4x512:w4:p0", "fma:16x256:w8:p0", "fma:4x1024:w8:p0",
         "fma:8x256:w4:p4"]  # fmt: skip
DOT = ["dot:16x256:w4:s4", "dot:32x128:w4:s4", "dot:32x256:w4:s3", "dot:64x128:w4:s4", "dot:16x128:w4:s6",
       "dot:32x64:w4:s6", "dot:64x64:w4:s5"]  # fmt: skip


@dataclass
class Dims:
    shapes: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
                                 "down_proj": (4096, 14336), "lm_head": (128256, 4096)}  # fmt: skip
    )
    q_size: int = 4096
    intermediate: int = 14336
    layers: int = 32
    m_values: tuple[int, ...] = (1, 2, 4, 8, 16)
    candidates: dict[int, list[str]] = field(
        default_factory=lambda: {1: FMA_1 + DOT[:3], 2: FMA_2 + DOT[:3], 4: FMA_4 + DOT[:4], 8: DOT, 16: DOT}
    )
    # The LM head writes float32 (other kernels specializations): a shorter list.
    lm_candidates: dict[int, list[str]] = field(
        default_factory=lambda: {1: FMA_1[:4] + FMA_1[7:8] + DOT[1:2], 2: FMA_2[:3] + DOT[1:2],
                                 4: FMA_4[:3] + DOT[1:2], 8: DOT[:3], 16: DOT[:3]}  # fmt: skip
    )
    dtype: torch.dtype = torch.bfloat16
    rotate_bytes: int = 400 << 20  # >= 8x the 50 MB L2
    replays: int = 15
    step_replays: int = 10
    smoke: bool = False  # CPU check of the script: Triton always "wins"; no "as in skinny_gemm.py" chain


QUICK = Dims(m_values=(1, 16), candidates={1: FMA_1[:5] + FMA_1[7:8] + DOT[1:2], 16: DOT[:4]},
             lm_candidates={1: FMA_1[:2] + DOT[1:2], 16: DOT[1:3]})  # fmt: skip
SMOKE = Dims(
    shapes={"qkv_proj": (48, 32), "o_proj": (32, 32), "gate_up_proj": (64, 32), "down_proj": (32, 32),
            "lm_head": (40, 32)},
    q_size=32, intermediate=32, layers=1, m_values=(1, 3),
    candidates={1: ["fma:8x32:w4:p0", "dot:16x32:w4:s2"], 4: ["fma:16x16:w4:p0", "dot:32x32:w4:s2"]},
    lm_candidates={1: ["fma:8x32:w4:p0"], 4: ["dot:16x32:w4:s2"]},
    dtype=torch.float16, rotate_bytes=1 << 12, replays=1, step_replays=1, smoke=True,
)  # fmt: skip
D = Dims()

failures: list[str] = []
DEADLINE = float("inf")


# ------------------------------------------------------------------------------------------------------ helpers


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def tolerance(out_dtype: torch.dtype) -> float:
    return 1e-4 if out_dtype == torch.float32 else 1e-2


def record_check(name: str, err: float, tol: float) -> bool:
    if err <= tol:
        return True
    failures.append(f"{name}: relative error {err:.2e} > {tol:.0e}")
    return False


def time_per_call(calls: list[Callable[[], object]], replays: int) -> float:
    """Milliseconds per call: the calls captured back to back in one CUDA graph, median replay time / len(calls).
    On the CPU (--smoke): one pass, wall clock."""
    if DEVICE == "cpu":
        start = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - start) * 1e3 / len(calls)
    for call in calls:  # compile / load outside the capture
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
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / len(calls)


def pdl_available() -> bool:
    return DEVICE == "cuda" and sg.HAS_GDC and torch.cuda.get_device_capability()[0] >= 9


def randn(*shape: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(D.dtype)


def out_dtype_for(shape: str) -> torch.dtype | None:
    return torch.float32 if shape == "lm_head" else None


def gemm_bytes(m: int, n: int, k: int, out_dtype: torch.dtype | None) -> int:
    item = torch.tensor([], dtype=D.dtype).element_size()
    out_item = torch.tensor([], dtype=out_dtype or D.dtype).element_size()
    return n * k * item + m * k * item + m * n * out_item


def fmt_us(ms: float) -> str:
    return f"{ms * 1e3:.1f}" if math.isfinite(ms) else "-"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    print(f"\n## {title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------------ sections


def section_copy_ceiling() -> None:
    if DEVICE == "cpu":
        return
    src = torch.randn(1 << 29, device=DEVICE).to(torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = time_per_call([lambda: dst.copy_(src)] * 4, D.replays)
    moved = 2 * src.numel() * src.element_size()
    print_table("device-to-device copy (the ceiling)", ["bytes moved", "ms", "TB/s", "vs 3.02 TB/s"],
                [[f"{moved / 1e9:.2f} GB", f"{ms:.3f}", f"{moved / ms / 1e9:.2f}",
                  f"{moved / ms / 1e9 / PEAK_BYTES_PER_S:.0%}"]])  # fmt: skip
    del src, dst


def make_weights(gen: torch.Generator) -> dict[str, list[torch.Tensor]]:
    """Per shape, enough distinct copies that their total is >= rotate_bytes (at least 2)."""
    weights = {}
    for name, (n, k) in D.shapes.items():
        copies = max(2, math.ceil(D.rotate_bytes / (n * k * 2)))
        weights[name] = [randn(n, k, gen=gen, scale=k**-0.5) for _ in range(copies)]
    return weights


def sweep_jobs(weights: dict[str, list[torch.Tensor]]) -> list[tuple[int, str, str, bool]]:
    return [(m, name, text, False) for m in D.m_values for name in weights
            for text in (D.lm_candidates if name == "lm_head" else D.candidates).get(sg.m_bucket(m), [])]  # fmt: skip


def precompile(jobs: list[tuple[int, str, str, bool]], weights: dict[str, list[torch.Tensor]], what: str) -> None:
    """Compile the kernel specializations of (M, shape, config, pdl) jobs in parallel threads (ptxas runs as a
    subprocess, and Triton's MLIR passes release the GIL). Failures are only reported: the timed run retries."""
    seen, unique = set(), []
    for m, name, text, pdl in jobs:  # one job per kernel specialization (all real N, K are multiples of 16)
        w = weights[name][0]
        key = (m, out_dtype_for(name), w.shape[1] % SkinnyConfig.parse(text).block_k == 0, text, pdl)
        if key not in seen:
            seen.add(key)
            unique.append((m, name, text, pdl, w[:256] if w.shape[0] > 256 else w))

    def run(job):
        m, name, text, pdl, w = job
        try:
            x = randn(m, w.shape[1], gen=torch.Generator(device=DEVICE).manual_seed(m))
            skinny_gemm(x, w, None, out_dtype_for(name), config=SkinnyConfig.parse(text), pdl=pdl)
        except Exception as exc:  # e.g. a config that does not compile: reported, and the timed run says more
            print(f"  precompile failed: M={m} {name} {text} pdl={pdl}: {type(exc).__name__}: {str(exc)[:200]}")

    start = time.perf_counter()
    if unique:
        run(unique[0])  # driver and launcher initialization, once, outside the threads
    workers = 1 if DEVICE == "cpu" else min(12, os.cpu_count() or 4)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, unique[1:]))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print(f"\n# {what}: compiled {len(unique)} kernel specializations in {time.perf_counter() - start:.1f} s "
          f"({workers} threads)")  # fmt: skip


@dataclass
class Result:
    m: int
    shape: str
    impl: str
    ms: float
    err: float
    ok: bool


def section_sweep(weights: dict[str, list[torch.Tensor]], gen: torch.Generator) -> list[Result]:
    results: list[Result] = []
    for m in D.m_values:
        for name, ws in weights.items():
            n, k = ws[0].shape
            out_dtype = out_dtype_for(name)
            x = randn(m, k, gen=gen)
            ref = x.double() @ ws[0].double().T
            target = out_dtype or D.dtype
            impls = [CUBLAS] + (D.lm_candidates if name == "lm_head" else D.candidates).get(sg.m_bucket(m), [])
            for impl in impls:
                if impl != CUBLAS and time.time() > DEADLINE:
                    print(f"  time budget: skipping {impl} at M={m} {name}")
                    continue
                try:
                    if impl == CUBLAS:
                        fn = lambda w: linear_ref(x, w, None, out_dtype)  # noqa: E731
                        out = fn(ws[0])
                    else:
                        config = SkinnyConfig.parse(impl)
                        fn = lambda w, c=config: skinny_gemm(x, w, None, out_dtype, config=c, pdl=False)  # noqa: E731
                        out = torch.full((m, n), float("nan"), dtype=target, device=DEVICE)
                        skinny_gemm(x, ws[0], None, out_dtype, config=config, pdl=False, out=out)
                    err = rel_err(out, ref)
                    # cuBLAS rounds to the weight dtype before the LM head's .float()
                    ok = record_check(f"M={m} {name} {impl}", err, tolerance(D.dtype if impl == CUBLAS else target))
                    ms = time_per_call([lambda w=w: fn(w) for w in ws], D.replays)
                except Exception as exc:
                    print(f"  M={m} {name} {impl} failed: {type(exc).__name__}: {str(exc)[:200]}")
                    failures.append(f"M={m} {name} {impl} raised {type(exc).__name__}")
                    continue
                results.append(Result(m, name, impl, ms, err, ok))
            del x, ref
        print_sweep_table(m, [r for r in results if r.m == m])
    return results


def print_sweep_table(m: int, results: list[Result]) -> None:
    shapes = list(D.shapes)
    impls = list(dict.fromkeys(r.impl for r in results))
    by = {(r.shape, r.impl): r for r in results}
    best = {}
    for shape in shapes:
        ok = [r for r in results if r.shape == shape and r.ok]
        if ok:
            best[shape] = min(ok, key=lambda r: r.ms).impl
    rows = []
    for impl in impls:
        row = [impl]
        for shape in shapes:
            r = by.get((shape, impl))
            if r is None:
                row.append("-")
                continue
            n, k = D.shapes[shape]
            gbs = gemm_bytes(m, n, k, out_dtype_for(shape)) / (r.ms * 1e-3) / 1e9
            mark = "*" if best.get(shape) == impl else (" x" if not r.ok else " ")
            row.append(f"{fmt_us(r.ms)} {gbs / (PEAK_BYTES_PER_S / 1e9):4.0%}{mark}")
        rows.append(row)
    header = ["impl"] + [f"{s} {D.shapes[s][0]}x{D.shapes[s][1]}" for s in shapes]
    print_table(f"M={m}: us per call [% of 3.02 TB/s]; * best, x failed check", header, rows)


def best_choices(results: list[Result]) -> dict[tuple[int, str], tuple[Result | None, Result | None]]:
    """(M, shape) -> (cuBLAS result, best Triton result)."""
    out = {}
    for m in D.m_values:
        for shape in D.shapes:
            mine = [r for r in results if r.m == m and r.shape == shape]
            cublas = next((r for r in mine if r.impl == CUBLAS), None)
            triton_ok = [r for r in mine if r.impl != CUBLAS and r.ok]
            out[(m, shape)] = (cublas, min(triton_ok, key=lambda r: r.ms) if triton_ok else None)
    return out


def winner(cublas: Result | None, best: Result | None) -> str | None:
    """The config string to use, or None for cuBLAS: Triton must beat cuBLAS by more than 1% (timing noise)."""
    if best is None:
        return None
    if cublas is None or best.ms < 0.99 * cublas.ms or D.smoke:
        return best.impl
    return None


def section_summary(results: list[Result]) -> dict[tuple[int, str], str | None]:
    choices = best_choices(results)
    rows, table = [], {}
    for (m, shape), (cublas, best) in choices.items():
        n, k = D.shapes[shape]
        nbytes = gemm_bytes(m, n, k, out_dtype_for(shape))
        pick = winner(cublas, best)
        table[(m, shape)] = pick
        cub_ms = cublas.ms if cublas else float("nan")
        best_ms = best.ms if best else float("nan")
        rows.append([f"M={m} {shape}", fmt_us(cub_ms), f"{nbytes / (cub_ms * 1e-3) / PEAK_BYTES_PER_S:.0%}",
                     best.impl if best else "-", fmt_us(best_ms),
                     f"{nbytes / (best_ms * 1e-3) / PEAK_BYTES_PER_S:.0%}", f"{cub_ms / best_ms:.2f}x",
                     pick or "cuBLAS"])  # fmt: skip
    print_table("best per (M, shape): cuBLAS vs the best Triton config",
                ["M shape", "cuBLAS us", "%peak", "best Triton", "us", "%peak", "speedup", "use"], rows)

    # The block to paste into kernels/skinny_gemm.py.
    print("\n## paste into kernels/skinny_gemm.py (measured on this device)")
    print("SKINNY_CONFIGS: dict[tuple[int, int, int], SkinnyConfig | None] = {")
    for (m, shape), (cublas, best) in choices.items():
        n, k = D.shapes[shape]
        pick = table[(m, shape)]
        best_us, cublas_us = fmt_us(best.ms) if best else "-", fmt_us(cublas.ms) if cublas else "-"
        note = f"{shape}: Triton {best_us} us, cuBLAS {cublas_us} us"
        print(f"    ({sg.m_bucket(m)}, {n}, {k}): {f'_c({pick!r})' if pick else 'None'},  # {note}")
    print("}")
    print("DEFAULT_CONFIGS: dict[int, SkinnyConfig | None] = {")
    for m in D.m_values:
        pick, detail = default_for(results, m)
        print(f"    {sg.m_bucket(m)}: {f'_c({pick!r})' if pick else 'None'},  # {detail}")
    print("}")
    return table


def default_for(results: list[Result], m: int) -> tuple[str | None, str]:
    """The config with the best geometric-mean time over the layer shapes (not the LM head, which is its own class
    of specialization), if it beats cuBLAS's geometric mean; else None."""
    layer_shapes = [s for s in D.shapes if s != "lm_head"]
    mine = [r for r in results if r.m == m and r.shape in layer_shapes]
    by_impl: dict[str, list[Result]] = {}
    for r in mine:
        by_impl.setdefault(r.impl, []).append(r)
    complete = {i: rs for i, rs in by_impl.items() if len(rs) == len(layer_shapes) and all(r.ok for r in rs)}
    if not complete:
        return None, "no config ran on every layer shape"
    geo = {i: math.exp(sum(math.log(r.ms) for r in rs) / len(rs)) for i, rs in complete.items()}
    best = min((i for i in geo if i != CUBLAS), key=geo.get, default=None)
    if best is None:
        return None, "no Triton config"
    cub = geo.get(CUBLAS, float("inf"))
    detail = f"geo-mean over layer shapes: {best} {geo[best] * 1e3:.1f} us, cuBLAS {cub * 1e3:.1f} us"
    return (best if geo[best] < 0.99 * cub else None), detail


# --------------------------------------------------------------------------------------------------- whole step


def step_jobs(table: dict[tuple[int, str], str | None]) -> list[tuple[int, str, str, bool]]:
    """The whole step's kernels not compiled by the sweep: the tuned configs with PDL, the module's own table."""
    jobs = []
    for (m, shape), pick in table.items():
        if pick and pdl_available():
            jobs.append((m, shape, pick, True))
        current = sg.pick_config(m, *D.shapes[shape])
        if current is not None and not D.smoke:
            jobs.append((m, shape, str(current), False))
    return jobs


def section_whole_step(table: dict[tuple[int, str], str | None]) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    h, q, inter = D.shapes["o_proj"][0], D.q_size, D.intermediate
    layers = [{name: randn(*D.shapes[name], gen=gen, scale=D.shapes[name][1] ** -0.5)
               for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")} for _ in range(D.layers)]  # fmt: skip
    lm = randn(*D.shapes["lm_head"], gen=gen, scale=D.shapes["lm_head"][1] ** -0.5)
    norm_w = (1 + 0.1 * torch.randn(h, generator=gen, device=DEVICE)).to(D.dtype)
    total = sum(w.numel() * w.element_size() for layer in layers for w in layer.values()) + lm.numel() * 2

    def chain(lin: Callable[[torch.Tensor, str, torch.Tensor], torch.Tensor], x: torch.Tensor, glue: bool):
        hidden = x
        for layer in layers:
            a = rms_norm(hidden, norm_w, 1e-6) if glue else hidden
            qkv = lin(a, "qkv_proj", layer["qkv_proj"])
            o = lin(qkv[:, :q], "o_proj", layer["o_proj"])
            g = rms_norm(o, norm_w, 1e-6) if glue else o
            gu = lin(g, "gate_up_proj", layer["gate_up_proj"])
            act = silu_and_mul(gu) if glue else gu[:, :inter]
            hidden = lin(act, "down_proj", layer["down_proj"])
        return lin(hidden, "lm_head", lm)

    def impl_cublas(m):
        return lambda x, shape, w: linear_ref(x, w, None, out_dtype_for(shape))

    def impl_triton(m, configs: dict[str, SkinnyConfig | None], pdl: bool):
        def lin(x, shape, w):
            config = configs[shape]
            if config is None:
                return linear_ref(x, w, None, out_dtype_for(shape))
            return skinny_gemm(x, w, None, out_dtype_for(shape), config=config, pdl=pdl)

        return lin

    rows = []
    for m in D.m_values:
        tuned = {s: SkinnyConfig.parse(table[(m, s)]) if table.get((m, s)) else None for s in D.shapes}
        current = {s: sg.pick_config(m, *D.shapes[s]) for s in D.shapes}
        impls = [("cuBLAS", impl_cublas(m)), ("Triton tuned (this run)", impl_triton(m, tuned, False))]
        if pdl_available():
            impls.append(("Triton tuned + PDL", impl_triton(m, tuned, True)))
        if current != tuned and not D.smoke:
            impls.append(("Triton as in skinny_gemm.py", impl_triton(m, current, False)))
        x = randn(m, h, gen=gen)
        for glue in (False, True):
            reference = None
            for label, lin in impls:
                if time.time() > DEADLINE and m != D.m_values[0]:
                    print(f"  time budget: skipping the whole step at M={m}")
                    break
                try:
                    logits = chain(lin, x, glue)
                    if reference is None:
                        reference = logits
                    err = rel_err(logits, reference)
                    ms = time_per_call([lambda lin=lin: chain(lin, x, glue)], D.step_replays)
                except Exception as exc:
                    traceback.print_exc()
                    failures.append(f"whole step M={m} {label} raised {type(exc).__name__}")
                    continue
                ok = record_check(f"whole step M={m} {label} vs cuBLAS", err, 0.3)
                rows.append([f"M={m}", "with glue" if glue else "GEMMs only", label, f"{ms:.3f}",
                             f"{m * 1e3 / ms:.0f}", f"{total / (ms * 1e-3) / 1e9:.0f}",
                             f"{total / (ms * 1e-3) / PEAK_BYTES_PER_S:.0%}",
                             f"{err:.1e}" + ("" if ok else " FAIL")])  # fmt: skip
    print_table(f"whole decode step: {D.layers} layers x (qkv, o, gate_up, down) + LM head in one CUDA graph, "
                f"{total / 1e9:.2f} GB of weights; 'with glue' adds 2 RMSNorms + SiLU-and-mul per layer; "
                "err = logits vs the cuBLAS chain",
                ["M", "chain", "impl", "ms/step", "tok/s", "GB/s", "%peak", "err"], rows)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- main


def main() -> int:
    global D, DEADLINE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="M in {1, 16}, fewer configs")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script; runs on CPU too)")
    parser.add_argument("--budget", type=float, default=100.0, help="seconds after which the sweep stops early")
    parser.add_argument("--no-step", action="store_true", help="skip the whole-step section")
    parser.add_argument("--json", type=str, default=None, help="write every measurement here")
    args = parser.parse_args()
    D = SMOKE if args.smoke else QUICK if args.quick else Dims()
    start = time.time()
    DEADLINE = start + args.budget
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)"
    print(f"# skinny GEMM benchmark on {name}; torch {torch.__version__}; dtype {D.dtype}; "
          f"PDL {'available' if pdl_available() else 'unavailable'}")  # fmt: skip
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    try:
        section_copy_ceiling()
        weights = make_weights(gen)
        precompile(sweep_jobs(weights), weights, "sweep")
        results = section_sweep(weights, gen)
        table = section_summary(results)
        if not args.no_step:
            precompile(step_jobs(table), weights, "whole step")
        del weights
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        if args.json:
            Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=1))
        if not args.no_step:
            section_whole_step(table)
    except Exception:
        traceback.print_exc()
        failures.append("the benchmark raised")
    print(f"\n# total {time.time() - start:.0f} s")
    if failures:
        print(f"# {len(failures)} FAILED checks:")
        for f in failures:
            print(f"#   {f}")
        return 1
    print("# all correctness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
