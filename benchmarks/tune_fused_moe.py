"""Tune the fused MoE launch configs on the GPU and store them in kernels/fused_moe_configs.json.

For every model shape and token count, sweeps BLOCK_M/N/K, GROUP_M, warps and stages, times each config on the whole
fused MoE (both grouped GEMMs; the align step depends on BLOCK_M), checks the fastest against the per-expert torch
loop, and (with ``--write``) records it under the shape's key. Until it is run, the table is empty and every shape
takes ``kernels.fused_moe.default_config`` (untuned defaults).

    python -m benchmarks.tune_fused_moe --write                      # W7 shapes, bf16, all token counts (H200)
    python -m benchmarks.tune_fused_moe --models qwen3-30b-a3b --tokens 1 64 256 --write
    python -m benchmarks.tune_fused_moe --int4 --write                # int4 experts (AWQ / GPTQ): entries of their own
    python -m benchmarks.tune_fused_moe --smoke --out /tmp/cfg.json  # tiny: checks the script (CPU: interpreter)
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import os
import sys
import time

from benchmarks.smoke import interpret_smoke_without_cuda

interpret_smoke_without_cuda()  # before kernels/ is imported

import torch  # noqa: E402

from benchmarks.bench_fused_moe import (DEVICE, SHAPES, SMOKE_SHAPES, bench_ms, check_problem,  # noqa: E402
                                        make_problem, per_rank_shapes)  # fmt: skip
from kernels.fused_moe import CONFIG_FILE, default_config, fused_moe_triton, shape_key  # noqa: E402

TUNE_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def candidate_configs(smoke: bool, tokens: int = 1, shape=None) -> list[dict[str, int]]:
    """The default config first, then the sweep in a seeded random order with row blocks no larger than the rows an
    expert gets: a time budget then samples the whole space instead of its first corner."""
    if smoke:
        return [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2),
                dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=2)]  # fmt: skip
    rows_per_expert = tokens * shape.top_k / shape.num_experts if shape is not None else 1 << 20
    space = itertools.product([16, 32, 64, 128], [32, 64, 128, 256], [64, 128, 256], [1, 16], [4, 8], [2, 3, 4, 5])
    sweep = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=g, num_warps=w, num_stages=s)
             for m, n, k, g, w, s in space
             if not (m * n >= 128 * 256 and w == 4) and (m == 16 or m <= 2 * rows_per_expert)]  # fmt: skip
    random.Random(tokens).shuffle(sweep)
    first = default_config(tokens, shape.num_experts) if shape is not None else None
    return ([first] if first else []) + [c for c in sweep if c != first]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--write", action="store_true", help="merge the results into --out")
    parser.add_argument("--out", default=str(CONFIG_FILE))
    parser.add_argument("--tp", type=int, default=1, help="one rank's shapes under tensor parallelism of this size")
    parser.add_argument("--budget-s", type=float, default=120.0, help="seconds of sweeping per (shape, tokens)")
    parser.add_argument("--fp8", action="store_true", help="experts in e4m3 (w8a16): a table entry of its own")
    parser.add_argument("--int4", action="store_true", help="experts in int4, groups of 128 (w4a16): an entry of its own")
    opts = parser.parse_args(argv)
    if opts.fp8 and opts.int4:
        parser.error("--fp8 and --int4 are two table entries: tune them in two runs")
    if DEVICE != "cuda" and not opts.smoke:
        print("tune_fused_moe needs a CUDA GPU; --smoke runs on CPU (interpreter)", file=sys.stderr)
        return 2
    shapes = SMOKE_SHAPES if opts.smoke else [s for s in SHAPES if not opts.models or s.name in opts.models]
    shapes = per_rank_shapes(shapes, opts.tp)
    token_counts = opts.tokens or ([4, 40] if opts.smoke else TUNE_TOKENS)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    results: dict[str, dict[str, dict[str, int]]] = {}
    failed = False
    for shape in shapes:
        key = shape_key(shape.num_experts, shape.hidden, shape.inter, dtype,
                        torch.float8_e4m3fn if opts.fp8 else "int4" if opts.int4 else None)  # fmt: skip
        for tokens in token_counts:
            p = make_problem(shape, tokens, dtype, seed=tokens, fp8=opts.fp8, int4_group=128 if opts.int4 else 0)
            best, best_ms, deadline = None, float("inf"), time.monotonic() + opts.budget_s
            for config in candidate_configs(opts.smoke, tokens, shape):
                if time.monotonic() > deadline:
                    break
                try:
                    ms = bench_ms(lambda: fused_moe_triton(p.x, p.w13, p.w2, p.topk_weights, p.topk_ids, config,
                                                           p.quant))  # fmt: skip
                except Exception as exc:  # out of shared memory / registers: skip this config
                    print(f"  skip {config}: {type(exc).__name__}")
                    continue
                if ms < best_ms:
                    best, best_ms = config, ms
            err = check_problem(p, best)
            ok = err <= tol
            failed |= not ok
            print(f"{shape.name} T={tokens}: {best_ms:.3f} ms {best} err {err:.1e} {'ok' if ok else 'FAIL'}")
            sys.stdout.flush()
            if ok:
                results.setdefault(key, {})[str(tokens)] = best
    if opts.write:
        table = json.loads(open(opts.out).read()) if os.path.exists(opts.out) else {"configs": {}}
        for key, by_tokens in results.items():
            table.setdefault("configs", {}).setdefault(key, {}).update(by_tokens)
        table["note"] = (f"Tuned with benchmarks/tune_fused_moe.py on {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU (smoke)'}"
                         "; shapes not listed take kernels.fused_moe.default_config (untuned defaults).")  # fmt: skip
        with open(opts.out, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        print(f"# wrote {sum(len(v) for v in results.values())} configs to {opts.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
