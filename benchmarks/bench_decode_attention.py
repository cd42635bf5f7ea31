"""Decode attention variants (benchmarks/decode_attention_variants.py) on the H100, timed inside CUDA graphs.

    python benchmarks/bench_decode_attention.py            # every case x every variant (< 2 minutes on an H100)
    python benchmarks/bench_decode_attention.py --sweep    # also tile/warps/stages configs on the W1/W2 cases
    python benchmarks/bench_decode_attention.py --cases w1,b1 --variants baseline,lpt-db32-fused
    python benchmarks/bench_decode_attention.py --smoke    # tiny shapes, no graphs: checks the script (CPU: interpreter)
    python benchmarks/bench_decode_attention.py --kv-cache-dtype fp8   # fp8 cache read paths + sweep on W1/W2 (~2 min)
    python benchmarks/bench_decode_attention.py --kv-cache-dtype fp8 --variants lpt-db32-fused  # also these variants

Each (case, variant): one CUDA graph of 28 back-to-back launches (one per layer) that rotate over several K/V cache
copies (enough that the copies together are >= 5x the 50 MB L2, at most 28) with distinct queries, replayed and timed
with events (median of 5 timings of 10 replays each); "us" is per launch. "% peak" is the K+V bytes of every cached
token read once (in the cache's own dtype) over ``--peak-tbps`` (4.28 TB/s: the H200's copy ceiling). "lpt" variants run twice: "+order" takes the permutation from the
caller (staged once per step by a runner, free in the graph); without it every launch sorts the lengths first (one
extra small launch per layer). Every variant is checked against a float32 reference (relative error < 1e-2), and the
graph's last output against an eager launch on the same inputs (bit-identical: a race in a fused merge would differ).
Exit status 1 when any check failed.

``--kv-cache-dtype fp8`` compares, on W1 and W2 (``--cases`` to change), the 16-bit cache (the engine's default
config), the first fp8 read path (``fp8_path="upcast"``: tiles cast to bf16), fp16 dots with plain casts (``"f16"``),
the default fp8 config (``FP8_DECODE_CONFIG``) and a sweep of tile / warps / stages on the ``"f16-vpairs"`` path (a
few on ``"f16"``), then prints the fastest of these over both cases (sum of us) as the ``FP8_DECODE_CONFIG`` line to
paste into kernels/decode_attention.py. With the default on the Gluon kernel (``fp8_path="gluon"``) its Triton config,
which serves the calls the Gluon kernel does not, is timed on its own as well; only Triton configs are candidates,
and the line keeps ``"gluon"`` (or says that it would turn the Gluon kernel off).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.smoke import interpret_smoke_without_cuda  # noqa: E402

interpret_smoke_without_cuda()  # before kernels/ is imported

import torch  # noqa: E402

from benchmarks.decode_attention_variants import DECODE_VARIANTS  # noqa: E402
from benchmarks.graph_timing import median_us_per_launch  # noqa: E402
from kernels.attention_common import fp8_triton_path  # noqa: E402
from kernels.backend import num_sms  # noqa: E402
from kernels.decode_attention import (  # noqa: E402
    DECODE_CONFIG,
    FP8_DECODE_CONFIG,
    DecodeConfig,
    decode_num_splits,
    decode_order,
    paged_decode_attention,
)
from kernels.paged_attention import paged_attention_ref  # noqa: E402

PEAK_BYTES_PER_S = 4.28e12  # --peak-tbps
L2_BYTES = 50 << 20
LAYERS = 28
TOL = 1e-2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    num_q_heads: int
    num_kv_heads: int
    batch: int
    context: tuple[int, int]  # uniform random lengths in [lo, hi]; lo == hi for a fixed length
    head_dim: int = 128
    softcap: float = 0.0


CASES = [
    Case("w1", "W1 qwen3-0.6b B=256 ctx U[150,2000]", 16, 8, 256, (150, 2000)),
    Case("w2", "W2 llama-8b B=256 ctx U[150,2000]", 32, 8, 256, (150, 2000)),
    Case("u1024", "llama-8b B=256 ctx 1024", 32, 8, 256, (1024, 1024)),
    Case("b64", "qwen3-0.6b B=64 ctx U[150,2000]", 16, 8, 64, (150, 2000)),
    Case("b8", "qwen3-0.6b B=8 ctx U[150,2000]", 16, 8, 8, (150, 2000)),
    Case("b1", "W3 llama-8b B=1 ctx 640", 32, 8, 1, (640, 640)),
    Case("g2", "W2-gemma gemma-2-9b B=224 ctx U[150,2000] D=256 softcap 50", 16, 8, 224, (150, 2000), 256, 50.0),
]
SMOKE_CASES = [Case("smoke", "smoke B=5 ctx U[1,90]", 4, 2, 5, (1, 90), 16),
               Case("smoke1", "smoke B=1 ctx 70", 4, 2, 1, (70, 70), 16),
               Case("smokecap", "smoke B=3 ctx U[1,40] softcap 30", 4, 2, 3, (1, 40), 16, 30.0)]
# (tile_n, warps, stages): Triton double-buffers K/V from 5 stages, triple-buffers from 7-8 (see kernels/NOTES.md)
SWEEP = [(16, 4, 5), (16, 4, 8), (32, 4, 7), (32, 8, 5), (64, 8, 5), (128, 8, 5)]
# Head dim 256: a [256, 64] bf16 K tile is 32 KB, so deep pipelines and wide tiles cost occupancy (g2 case)
WIDE_SWEEP = [(16, 4, 2), (16, 4, 3), (16, 4, 5), (32, 4, 2), (32, 4, 3), (32, 4, 4), (32, 8, 2), (32, 8, 3),
              (64, 4, 1), (64, 8, 2), (16, 2, 3), (32, 2, 2)]
# fp8 cache sweep on the "f16-vpairs" path (tile_n, warps, stages): half-size tiles may want more keys per tile; the
# loop's instruction counts, registers and shared memory of each are in benchmarks/attention_sass.py's output.
# (fp8_path, tile_n, warps, stages[, max_registers]); the default FP8_DECODE_CONFIG and "f16" at 64/4/2 run anyway.
# "f16-vsplit" (p @ v in two halves of the keys) halves the fp16 V tile staged in shared memory: at 128/4/2 with 128
# registers 4 programs fit on an SM instead of 3, at 64/4/2 5 instead of 4 (offline, attention_sass.py); the
# seventh session's Nsight Compute profile found the fp8 kernel latency-bound at 3 programs per SM.
FP8_SWEEP = [("f16-vpairs", 128, 4, 2), ("f16-vpairs", 64, 4, 3), ("f16", 128, 4, 2),
             ("f16-vsplit", 128, 4, 3), ("f16-vsplit", 128, 4, 2, 128), ("f16-vsplit", 128, 4, 3, 128),
             ("f16-vsplit", 128, 4, 4, 128), ("f16-vsplit", 128, 4, 3, 112), ("f16-vsplit", 128, 4, 3, 96),
             ("f16-vsplit", 128, 4, 4, 96), ("f16-vsplit", 64, 4, 3, 128), ("f16-vsplit", 64, 4, 4, 96),
             ("f16-vsplit", 64, 4, 5, 96), ("f16-vsplit", 256, 4, 2, 128), ("f16-vsplit", 256, 8, 2, 128),
             ("f16-vsplit", 256, 8, 3, 96), ("f16-vsplit", 128, 8, 3, 96), ("f16-vsplit", 128, 8, 4, 64)]  # fmt: skip
FP8_SMOKE_SWEEP = [("f16-vpairs", 16, 4, 2), ("f16-vpairs", 32, 4, 3), ("f16-vsplit", 32, 4, 2, 128)]


@dataclass
class Problem:
    queries: list[torch.Tensor]  # one [B, Hq, D] per cache copy
    caches: list[tuple[torch.Tensor, torch.Tensor]]  # K/V copies, same block layout
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float
    kv_bytes: int  # K + V bytes of every cached token (one launch)
    lens: list[int]
    softcap: float = 0.0

    def args(self, i: int) -> tuple:
        k, v = self.caches[i % len(self.caches)]
        q = self.queries[i % len(self.queries)]
        return (q, k, v, self.block_tables, self.seq_lens, self.query_start_loc, self.scale)


def make_problem(case: Case, head_dim: int, block_size: int, table_width: int, dtype: torch.dtype, seed: int,
                 cache_dtype: torch.dtype | None = None) -> Problem:  # fmt: skip
    """Random lengths, each sequence's blocks scattered over a random permutation of the cache (unused table entries
    point at random blocks); every slot holds random values, never zeros. ``cache_dtype`` (default ``dtype``):
    ``torch.float8_e4m3fn`` is an fp8 KV cache (scale 1), read into ``dtype``."""
    cache_dtype = cache_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    lo, hi = case.context
    lens = torch.randint(lo, hi + 1, (case.batch,), generator=gen).tolist()
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 16
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.randint(0, num_blocks, (case.batch, table_width), generator=gen, dtype=torch.int32)
    start = 0
    for i, n in enumerate(needed):
        table[i, :n] = perm[start : start + n]
        start += n
    kv_bytes = sum(lens) * case.num_kv_heads * head_dim * 2 * cache_dtype.itemsize
    copy_bytes = 2 * num_blocks * block_size * case.num_kv_heads * head_dim * cache_dtype.itemsize
    copies = 1 if DEVICE == "cpu" else max(2, min(LAYERS, math.ceil(5 * L2_BYTES / copy_bytes)))
    dgen = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (num_blocks, block_size, case.num_kv_heads, head_dim)

    def randn(*s, to=dtype):
        return torch.randn(*s, generator=dgen, device=DEVICE, dtype=torch.float32).to(to)

    caches = [(randn(*shape, to=cache_dtype), randn(*shape, to=cache_dtype)) for _ in range(copies)]
    queries = [randn(case.batch, case.num_q_heads, head_dim) for _ in range(copies)]
    return Problem(queries, caches, table.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                   torch.arange(case.batch + 1, dtype=torch.int32, device=DEVICE), head_dim**-0.5, kv_bytes, lens,
                   case.softcap)  # fmt: skip


def float32_reference(args, seqs_per_chunk: int = 16, softcap: float = 0.0) -> torch.Tensor:
    q, k, v, table, seq_lens, qsl, scale = args
    k32, v32 = k.float(), v.float()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for s in range(0, q.shape[0], seqs_per_chunk):
        e = min(s + seqs_per_chunk, q.shape[0])
        out[s:e] = paged_attention_ref(q[s:e].float(), k32, v32, table[s:e], seq_lens[s:e], qsl[s : e + 1] - s, scale,
                                         softcap=softcap)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


@dataclass
class Result:
    case: Case
    name: str
    us: float
    err: float
    graph_matches_eager: bool
    splits: int

    def ok(self) -> bool:
        return self.err <= TOL and self.graph_matches_eager


def run_variant(problem: Problem, case: Case, name: str, config: DecodeConfig, caller_order: bool,
                ref: torch.Tensor) -> Result:  # fmt: skip
    """Check on copy 0 (poisoned output), then time a graph of LAYERS launches over the rotating copies."""
    order = decode_order(problem.seq_lens) if caller_order else None
    out = torch.full_like(problem.queries[0], float("nan"))

    def launch(i: int) -> torch.Tensor:
        return paged_decode_attention(*problem.args(i), out=out, config=config, seq_order=order,
                                      softcap=problem.softcap)

    launch(0)
    err = rel_err(out, ref)
    splits = decode_num_splits(case.batch, case.num_kv_heads, problem.block_tables.shape[1],
                               problem.caches[0][0].shape[1], num_sms(0 if DEVICE == "cuda" else None), config)  # fmt: skip
    if DEVICE == "cpu":  # --smoke without a GPU: interpreted, one eager launch timed by the wall clock
        start = time.perf_counter()
        launch(1)
        return Result(case, name, (time.perf_counter() - start) * 1e6, err, True, splits)

    us = median_us_per_launch(launch, LAYERS, warm_layers=len(problem.caches))
    graph_out = out.clone()
    eager = launch(LAYERS - 1)
    matches = torch.equal(graph_out, eager)
    return Result(case, name, us, err, matches, splits)


def variants(names: list[str], sweep: bool, wide: bool = False) -> list[tuple[str, DecodeConfig, bool]]:
    out = []
    for name in names:
        config = DECODE_VARIANTS[name]
        out.append((name, config, False))
        if config.order == "lpt":
            out.append((f"{name} +order", config, True))
    if sweep:
        for tile, warps, stages in WIDE_SWEEP if wide else SWEEP:
            config = DecodeConfig(tile_n=tile, num_warps=warps, num_stages=stages, order="lpt", fused_reduce=True)
            out.append((f"sweep lpt-fused {tile}/{warps}/{stages} +order", config, True))
    return out


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(f"\n## {title}")
    print("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    sys.stdout.flush()


def print_header(dtype: torch.dtype, cache_dtype: torch.dtype, config: DecodeConfig) -> None:
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        import triton

        print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    print(f"# default decode config: {config}; queries {dtype}, KV cache {cache_dtype}")


def fp8_runs(names: list[str], smoke: bool) -> list[tuple[str, DecodeConfig, bool]]:
    """(label, config, caller order) of the fp8-cache runs: the read paths at the engine's 16-bit config, the default
    fp8 config, the named variants, the sweep."""
    base = dataclasses.replace(DECODE_CONFIG)
    runs = [(f"fp8 upcast (first path) {fmt(base)}", dataclasses.replace(base, fp8_path="upcast"), True),
            (f"fp8 f16 dots {fmt(base)}", dataclasses.replace(base, fp8_path="f16"), True),
            (f"fp8 default FP8_DECODE_CONFIG {fmt(FP8_DECODE_CONFIG)}", FP8_DECODE_CONFIG, True)]
    if FP8_DECODE_CONFIG.fp8_path == "gluon":  # the Gluon kernel on the GPU; its Triton config serves the rest
        runs.append((f"fp8 default's Triton kernel {fmt(FP8_DECODE_CONFIG)}",
                     dataclasses.replace(FP8_DECODE_CONFIG, fp8_path=fp8_triton_path("gluon")), True))  # fmt: skip
    for name in names:
        config = DECODE_VARIANTS[name]
        runs.append((f"fp8 variant {name}", config, config.order == "lpt"))
    for path, tile, warps, stages, *max_registers in FP8_SMOKE_SWEEP if smoke else FP8_SWEEP:
        config = DecodeConfig(tile_n=tile, num_warps=warps, num_stages=stages, order="lpt", fused_reduce=False,
                              fp8_path=path, max_registers=max_registers[0] if max_registers else None)  # fmt: skip
        if config != FP8_DECODE_CONFIG:
            runs.append((f"sweep {path} {fmt(config)}", config, True))
    return runs


def fmt(config: DecodeConfig) -> str:
    return (f"{config.tile_n}/{config.num_warps}/{config.num_stages} {config.order}{' fused' if config.fused_reduce else ''}"
            f"{f' maxnreg={config.max_registers}' if config.max_registers else ''}")


def compare_fp8(opts, cases: list[Case]) -> int:
    """The --kv-cache-dtype fp8 report: 16-bit cache vs the fp8 read paths and the sweep, per case; then the fastest
    sweep config over all cases as the line to paste."""
    block_size, table_width = (16, 16) if opts.smoke else (16, 4096 // 16)
    dtype = torch.float16 if opts.smoke and DEVICE == "cpu" else torch.bfloat16
    print_header(dtype, torch.float8_e4m3fn, FP8_DECODE_CONFIG)
    names = [n for n in opts.variants.split(",") if n]
    started = time.time()
    rows: list[list[str]] = []
    sweep_us: dict[str, dict[str, float]] = {}  # config label -> case -> us (passing runs only)
    sweep_configs: dict[str, DecodeConfig] = {}
    failed: list[str] = []
    errors: dict[tuple[str, str], str] = {}
    for n, case in enumerate(cases):
        t0 = time.time()
        results: list[tuple[str, Result, int]] = []
        problem = make_problem(case, case.head_dim, block_size, table_width, dtype, seed=n)
        ref = float32_reference(problem.args(0), softcap=case.softcap)
        results.append((f"{dtype_name(dtype)} cache {fmt(DECODE_CONFIG)}",
                        run_variant(problem, case, "16-bit", DECODE_CONFIG, DECODE_CONFIG.order == "lpt", ref),
                        problem.kv_bytes))  # fmt: skip
        del problem, ref
        problem = make_problem(case, case.head_dim, block_size, table_width, dtype, seed=n,
                               cache_dtype=torch.float8_e4m3fn)  # fmt: skip
        ref = float32_reference(problem.args(0), softcap=case.softcap)
        for label, config, caller_order in fp8_runs(names, opts.smoke):
            try:  # one config that cannot compile or launch (e.g. out of shared memory) must not lose the others
                result = run_variant(problem, case, label, config, caller_order, ref)
            except Exception as exc:  # noqa: BLE001 - reported in the table and in the exit status
                errors[(case.key, label)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                result = Result(case, label, float("nan"), float("inf"), False, 0)
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
            results.append((label, result, problem.kv_bytes))
            # candidates to paste: Triton configs only (the Gluon kernel has no tile config to choose)
            if label.startswith(("sweep", "fp8 default", "fp8 f16 dots")) and config.fp8_path != "gluon" and result.ok():
                sweep_us.setdefault(label, {})[case.key] = result.us
                sweep_configs[label] = config
        print(f"  {case.label}: {time.time() - t0:.0f} s")
        sys.stdout.flush()
        del problem, ref
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        bf16_us = results[0][1].us
        old_us = results[1][1].us
        for label, r, kv_bytes in results:
            gbs = kv_bytes / (r.us * 1e-6)
            rows.append([case.key, label, f"{r.us:.1f}", f"{gbs / 1e9:.0f}", f"{gbs / PEAK_BYTES_PER_S:.0%}",
                         f"{bf16_us / r.us:.2f}x", f"{old_us / r.us:.2f}x", f"{r.err:.1e}", "ok" if r.ok() else "FAIL"])  # fmt: skip
            if (case.key, label) in errors:
                failed.append(f"{case.key} {label}: {errors[case.key, label]}")
            elif not r.ok():
                failed.append(f"{case.key} {label}: rel err {r.err:.2e}, graph == eager: {r.graph_matches_eager}")
    print_table(f"fp8 KV cache decode attention, us per launch inside a CUDA graph of {LAYERS} launches; GB/s of the "
                f"cache's own K+V bytes; % of {PEAK_BYTES_PER_S / 1e12:.2f} TB/s",
                ["case", "run", "us", "GB/s", "% peak", "vs 16-bit", "vs fp8 first", "rel err", "check"], rows)  # fmt: skip
    complete = {label: us for label, us in sweep_us.items() if len(us) == len(cases)}
    if complete:
        best = min(complete, key=lambda label: sum(complete[label].values()))
        config = sweep_configs[best]
        per_case = ", ".join(f"{k} {v:.1f} us" for k, v in complete[best].items())
        print(f"\n# fastest fp8 config over {', '.join(c.key for c in cases)} (sum of us): {best} ({per_case})")
        print("# paste into kernels/decode_attention.py:")
        registers = f", max_registers={config.max_registers}" if config.max_registers else ""
        path = config.fp8_path
        if FP8_DECODE_CONFIG.fp8_path == "gluon":
            if path == fp8_triton_path("gluon"):
                path = "gluon"
                print("# (the Triton kernel's config for the calls the Gluon kernel does not serve; \"gluon\" kept)")
            else:
                print(f"# note: fp8_path=\"{path}\" turns the Gluon kernel off (it runs where \"gluon\" is set)")
        print(f"FP8_DECODE_CONFIG = DecodeConfig(tile_n={config.tile_n}, num_warps={config.num_warps}, "
              f"num_stages={config.num_stages}, order=\"lpt\", fused_reduce=False, fp8_path=\"{path}\""
              f"{registers})")  # fmt: skip
    print(f"\n# total {time.time() - started:.0f} s")
    if failed:
        for line in failed:
            print(f"# FAILED {line}")
        return 1
    print("# all correctness checks passed")
    return 0


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main() -> int:
    global PEAK_BYTES_PER_S
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script (CPU: interpreter)")
    parser.add_argument("--sweep", action="store_true", help="also sweep tile/warps/stages on the W1 and W2 cases")
    parser.add_argument("--cases", default="", help="comma-separated case keys: " + ",".join(c.key for c in CASES))
    parser.add_argument("--variants", default="", help="comma-separated DECODE_VARIANTS names (default: all)")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="fp8: compare the fp8 cache read paths and sweep their configs on W1/W2 (GB/s and %% "
                             "peak count the fp8 bytes)")  # fmt: skip
    parser.add_argument("--peak-tbps", type=float, default=PEAK_BYTES_PER_S / 1e12,
                        help="copy ceiling for %% peak, TB/s (H200: 4.28; H100: 3.02)")
    opts = parser.parse_args()
    PEAK_BYTES_PER_S = opts.peak_tbps * 1e12
    if DEVICE != "cuda" and not opts.smoke:
        print("bench_decode_attention.py needs a CUDA GPU; --smoke runs on CPU", file=sys.stderr)
        return 1
    cases = SMOKE_CASES if opts.smoke else CASES
    if opts.kv_cache_dtype == "fp8" and not opts.cases and not opts.smoke:
        opts.cases = "w1,w2"
    if opts.cases:
        wanted = opts.cases.split(",")
        cases = [c for c in cases if c.key in wanted]
    if opts.kv_cache_dtype == "fp8":
        return compare_fp8(opts, cases)
    names = opts.variants.split(",") if opts.variants else list(DECODE_VARIANTS)
    if opts.smoke:
        names = names if opts.variants else ["baseline", "lpt-db32-fused", "fused"]
    block_size, table_width = (16, 16) if opts.smoke else (16, 4096 // 16)
    dtype = torch.float16 if opts.smoke and DEVICE == "cpu" else torch.bfloat16
    cache_dtype = dtype
    print_header(dtype, cache_dtype, DECODE_CONFIG)
    started = time.time()
    results: list[Result] = []
    case_bytes: dict[str, int] = {}
    for n, case in enumerate(cases):
        t0 = time.time()
        problem = make_problem(case, case.head_dim, block_size, table_width, dtype, seed=n, cache_dtype=cache_dtype)
        ref = float32_reference(problem.args(0), softcap=case.softcap)
        case_bytes[case.key] = problem.kv_bytes
        for name, config, caller_order in variants(names, opts.sweep and case.key in ("w1", "w2", "g2"),
                                                   wide=case.head_dim > 128):  # fmt: skip
            results.append(run_variant(problem, case, name, config, caller_order, ref))
        print(f"  {case.label}: {len(problem.caches)} cache copies of {problem.kv_bytes / 1e6:.1f} MB read per launch, "
              f"{time.time() - t0:.0f} s")  # fmt: skip
        del problem, ref
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    rows, best_rows = [], []
    for case in cases:
        mine = [r for r in results if r.case is case]
        base = next((r.us for r in mine if r.name == "baseline"), float("nan"))
        for r in mine:
            gbs = case_bytes[case.key] / (r.us * 1e-6)
            rows.append([case.key, r.name, str(r.splits), f"{r.us:.1f}", f"{gbs / 1e9:.0f}", f"{gbs / PEAK_BYTES_PER_S:.0%}",
                         f"{base / r.us:.2f}x", f"{r.err:.1e}", "ok" if r.ok() else "FAIL"])  # fmt: skip
        good = [r for r in mine if r.ok()]
        if good:
            best = min(good, key=lambda r: r.us)
            best_rows.append([case.key, best.name, f"{best.us:.1f}", f"{case_bytes[case.key] / (best.us * 1e-6) / PEAK_BYTES_PER_S:.0%}",
                              f"{base / best.us:.2f}x", case.label])  # fmt: skip
    print_table("decode attention, us per launch inside a CUDA graph of 28 launches; speedup vs baseline",
                ["case", "variant", "splits", "us", "GB/s", "% peak", "speedup", "rel err", "check"], rows)  # fmt: skip
    print_table("best variant per case", ["case", "variant", "us", "% peak", "speedup", "shape"], best_rows)
    failed = [r for r in results if not r.ok()]
    print(f"\n# total {time.time() - started:.0f} s")
    if failed:
        for r in failed:
            print(f"# FAILED {r.case.key} {r.name}: rel err {r.err:.2e}, graph == eager: {r.graph_matches_eager}")
        return 1
    print("# all correctness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
