"""Attention of a speculative verify step (every sequence: its last token and k drafts) on the GPU, timed inside CUDA
graphs: the multi-query decode kernel (what the engine runs since issue 9's routing) against the varlen prefill
kernel (what it ran before), with a plain one-query decode step beside them for scale.

    python benchmarks/bench_verify_attention.py              # SmolLM2-135M dims, B = 1 and 16, Q = 6 (< 1 minute)
    python benchmarks/bench_verify_attention.py --batches 1,4,16,64 --queries 4,6 --context 300,1500
    python benchmarks/bench_verify_attention.py --sweep      # also tile / warps / stages of the multi-query kernel
    python benchmarks/bench_verify_attention.py --smoke      # tiny shapes, no graphs: checks the script (CPU)

Each (batch, queries, variant): one CUDA graph of ``--layers`` (30: SmolLM2) back-to-back launches, each on its own
K/V cache (one per layer, as in the engine), replayed and timed with events (median of 5 timings of 10 replays each);
"us" is per launch (one layer). Context lengths are uniform in ``--context`` (the default, 300-1500, is W6's:
300-600-token passages plus up to 256 generated tokens and the chat template). Variants:

- ``varlen``: ``paged_prefill_attention``, the varlen prefill kernel (the verify path before; what
  ``paged_attention`` picks for ``max_query_len > 1`` without ``decode_queries``);
- ``mq-decode``: ``paged_decode_attention(..., queries=Q)`` with the default configs, what ``paged_attention(...,
  decode_queries=Q)`` launches in the engine (split-K with the fused last-arriver merge when the batch leaves the GPU
  short of programs);
- ``mq-decode unfused`` / ``mq-decode 1 split``: the same kernel with the separate reduce kernel / without split-K;
- ``decode Q=1``: a plain decode step's attention on the same contexts (one query row per sequence).

Every variant is checked against a float32 torch reference (relative error < 1e-2) and the graph's last output
against an eager launch on the same inputs (bit-identical). Exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.smoke import interpret_smoke_without_cuda  # noqa: E402

interpret_smoke_without_cuda()  # before kernels/ is imported

import torch  # noqa: E402

from benchmarks.graph_timing import median_us_per_launch  # noqa: E402

from kernels.backend import num_sms  # noqa: E402
from kernels.decode_attention import (  # noqa: E402
    decode_num_splits,
    default_decode_configs,
    decode_order,
    paged_decode_attention,
)
from kernels.paged_attention import paged_attention_ref  # noqa: E402
from kernels.prefill_attention import paged_prefill_attention  # noqa: E402

TOL = 1e-2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Problem:
    q: torch.Tensor  # [B * Q, Hq, D]: Q rows per sequence
    decode_q: torch.Tensor  # [B, Hq, D]: one row per sequence (the plain decode comparison)
    caches: list[tuple[torch.Tensor, torch.Tensor]]  # one K/V pair per layer, same block layout
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    decode_start_loc: torch.Tensor
    order: torch.Tensor
    scale: float
    queries: int


def make_problem(batch: int, queries: int, context: tuple[int, int], heads: tuple[int, int], head_dim: int,
                 block_size: int, layers: int, dtype: torch.dtype, seed: int) -> Problem:  # fmt: skip
    """Random context lengths, each sequence's blocks scattered over a random permutation of the cache; random
    values in every slot (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(context[0], context[1] + 1, (batch,), generator=gen).tolist()
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 8
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.randint(0, num_blocks, (batch, max(needed) + 2), generator=gen, dtype=torch.int32)
    start = 0
    for i, n in enumerate(needed):
        table[i, :n] = perm[start : start + n]
        start += n
    num_q, num_kv = heads
    dgen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=dgen, device=DEVICE, dtype=torch.float32).to(dtype)

    shape = (num_blocks, block_size, num_kv, head_dim)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return Problem(
        q=randn(batch * queries, num_q, head_dim), decode_q=randn(batch, num_q, head_dim),
        caches=[(randn(*shape), randn(*shape)) for _ in range(layers)], block_tables=table.to(DEVICE),
        seq_lens=seq_lens,
        query_start_loc=torch.arange(0, batch * queries + 1, queries, dtype=torch.int32, device=DEVICE),
        decode_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=DEVICE),
        order=decode_order(seq_lens), scale=head_dim**-0.5, queries=queries,
    )  # fmt: skip


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


# --sweep: (tile_n, warps, stages) of the multi-query decode kernel, under the default split choice and merge
SWEEP = [(32, 4, 2), (64, 4, 2), (64, 8, 2), (32, 4, 5), (64, 8, 3), (128, 8, 2)]


def variants(problem: Problem, sweep: bool = False) -> dict[str, object]:
    """name -> launch(layer, out): one attention launch of that variant on the layer's cache."""
    p = problem
    split_config = default_decode_configs(False, p.q.shape[2])[1]
    unfused = dataclasses.replace(split_config, fused_reduce=False)

    def args(q, qsl, layer):
        k, v = p.caches[layer]
        return (q, k, v, p.block_tables, p.seq_lens, qsl, p.scale)

    out = {
        "varlen": lambda layer, out: paged_prefill_attention(*args(p.q, p.query_start_loc, layer), out=out),
        "mq-decode": lambda layer, out: paged_decode_attention(*args(p.q, p.query_start_loc, layer), out=out,
                                                               seq_order=p.order, queries=p.queries),
        "mq-decode unfused": lambda layer, out: paged_decode_attention(*args(p.q, p.query_start_loc, layer),
                                                                       out=out, config=unfused, queries=p.queries),
        "mq-decode 1 split": lambda layer, out: paged_decode_attention(*args(p.q, p.query_start_loc, layer),
                                                                       out=out, num_splits=1, seq_order=p.order,
                                                                       queries=p.queries),
        "decode Q=1": lambda layer, out: paged_decode_attention(*args(p.decode_q, p.decode_start_loc, layer),
                                                                out=out, seq_order=p.order),
    }  # fmt: skip
    if sweep:
        unsplit_config = default_decode_configs(False, p.q.shape[2])[0]
        splits = decode_num_splits(p.seq_lens.shape[0], p.caches[0][0].shape[2], p.block_tables.shape[1],
                                   p.caches[0][0].shape[1], num_sms(0 if DEVICE == "cuda" else None), unsplit_config)
        base = split_config if splits > 1 else unsplit_config
        for tile_n, warps, stages in SWEEP if DEVICE == "cuda" else SWEEP[2:3]:  # the interpreter: one of them
            config = dataclasses.replace(base, tile_n=tile_n, num_warps=warps, num_stages=stages)
            out[f"mq {tile_n}/{warps}/{stages}"] = functools.partial(_launch_config, p, config)
    return out


def _launch_config(p: Problem, config, layer: int, out: torch.Tensor) -> torch.Tensor:
    k, v = p.caches[layer]
    return paged_decode_attention(p.q, k, v, p.block_tables, p.seq_lens, p.query_start_loc, p.scale, out=out,
                                  config=config, seq_order=p.order, queries=p.queries)


@dataclass
class Result:
    name: str
    us: float
    err: float
    graph_matches_eager: bool

    def ok(self) -> bool:
        return self.err <= TOL and self.graph_matches_eager


def run_variant(name: str, launch, q: torch.Tensor, ref: torch.Tensor, layers: int) -> Result:
    """Check layer 0's output (poisoned buffer first), then time a graph of ``layers`` launches."""
    out = torch.full_like(q, float("nan"))
    launch(0, out)
    err = rel_err(out, ref)
    if DEVICE == "cpu":  # --smoke without a GPU: interpreted, one eager launch timed by the wall clock
        start = time.perf_counter()
        launch(min(1, layers - 1), out)
        return Result(name, (time.perf_counter() - start) * 1e6, err, True)
    us = median_us_per_launch(lambda layer: launch(layer, out), layers)
    graph_out = out.clone()
    eager = launch(layers - 1, out)
    matches = torch.equal(graph_out, eager)
    return Result(name, us, err, matches)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--queries", default="6", help="comma-separated query rows per sequence (1 + k)")
    parser.add_argument("--context", default="300,1500", help="context lengths: uniform in lo,hi")
    parser.add_argument("--heads", default="9,3", help="query heads, KV heads (SmolLM2-135M: 9,3)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=30, help="launches per graph, each on its own cache")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--sweep", action="store_true", help="also tile/warps/stages configs of the multi-query kernel")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, no graphs (CPU: the interpreter)")
    opts = parser.parse_args()
    batches = [int(x) for x in opts.batches.split(",")]
    query_counts = [int(x) for x in opts.queries.split(",")]
    context = tuple(int(x) for x in opts.context.split(","))
    heads = tuple(int(x) for x in opts.heads.split(","))
    dtype = getattr(torch, opts.dtype)
    head_dim, layers = opts.head_dim, opts.layers
    if opts.smoke:
        batches, query_counts, context, head_dim, layers = [1, 3], [4], (250, 400), 16, 2  # split at B=1
        dtype = torch.float32 if DEVICE == "cpu" else dtype
    sms = num_sms(0 if DEVICE == "cuda" else None)
    device_name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "interpreter"
    print(f"# verify-step attention: {DEVICE} ({device_name}), "
          f"{dtype}, heads {heads[0]}/{heads[1]}, head dim {head_dim}, block {opts.block_size}, context "
          f"U[{context[0]},{context[1]}], {layers} launches per graph, {sms} SMs")  # fmt: skip
    failed = False
    for batch in batches:
        for queries in query_counts:
            problem = make_problem(batch, queries, context, heads, head_dim, opts.block_size, layers, dtype,
                                   seed=batch * 100 + queries)  # fmt: skip
            k0, v0 = problem.caches[0]
            common = (k0.float(), v0.float(), problem.block_tables, problem.seq_lens)
            ref = paged_attention_ref(problem.q.float(), *common, problem.query_start_loc, problem.scale)
            decode_ref = paged_attention_ref(problem.decode_q.float(), *common, problem.decode_start_loc,
                                             problem.scale)  # fmt: skip
            splits = decode_num_splits(batch, heads[1], problem.block_tables.shape[1], opts.block_size, sms,
                                       default_decode_configs(False, head_dim)[0])  # fmt: skip
            print(f"\n## B={batch} Q={queries} (decode split-K factor {splits})")
            print(f"{'variant':<20} {'us/layer':>9} {'x varlen':>9} {'rel err':>9}  graph==eager")
            results = []
            for name, launch in variants(problem, opts.sweep).items():
                q, r = (problem.decode_q, decode_ref) if name == "decode Q=1" else (problem.q, ref)
                results.append(run_variant(name, launch, q, r, layers))
            base = results[0].us
            for res in results:
                failed |= not res.ok()
                print(f"{res.name:<20} {res.us:9.2f} {base / res.us:9.2f} {res.err:9.1e}  "
                      f"{'yes' if res.graph_matches_eager else 'NO'}{'' if res.ok() else '  FAILED'}")  # fmt: skip
    print("\n# " + ("SOME CHECKS FAILED" if failed else "all correctness checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
