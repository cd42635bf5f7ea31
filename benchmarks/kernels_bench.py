"""GPU micro-benchmark of pagedserve's Triton kernels against their torch references, with a correctness check at
every shape. Run from the repository root on a CUDA machine (finishes in well under 3 minutes on an H100):

    python benchmarks/kernels_bench.py            # everything
    python benchmarks/kernels_bench.py --quick    # fewer shapes, no config sweeps
    python benchmarks/kernels_bench.py --smoke    # tiny shapes: checks the script itself, also on CPU (interpreter)
    python benchmarks/kernels_bench.py --only sampler   # one section (names as printed: "decode", "sampler", ...)

Times are medians of ``triton.testing.do_bench`` (which flushes L2 between runs). Decode attention is memory-bound:
the "% peak" column is achieved bytes/s (K and V of every cached token read once) over the 3.02 TB/s device-to-device
copy ceiling measured on the H100 (../shared/BENCHMARKS.md); the script also measures the copy ceiling itself.
Prefill attention reports TFLOP/s (causal FLOPs only) beside torch's flash-attention SDPA on contiguous K/V.
Exit status: 0 when every check passed, 1 when any check failed or any section raised.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.smoke import interpret_smoke_without_cuda  # noqa: E402

interpret_smoke_without_cuda()  # before kernels/ is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kernels.activation import silu_and_mul_ref, silu_and_mul_triton  # noqa: E402
from kernels.attention_prep import attention_prep_ref, attention_prep_triton  # noqa: E402
from kernels.backend import num_sms  # noqa: E402
from kernels.decode_attention import (  # noqa: E402
    DECODE_CONFIG,
    DecodeConfig,
    decode_num_splits,
    paged_decode_attention,
)
from kernels.paged_attention import paged_attention_ref  # noqa: E402
from kernels.prefill_attention import PrefillConfig, paged_prefill_attention, pick_prefill_config  # noqa: E402
from kernels.rmsnorm import rms_norm_ref, rms_norm_triton  # noqa: E402
from kernels.sampling import DEFAULT_BLOCK, gumbel_argmax_triton, gumbel_scores_ref, num_vocab_splits  # noqa: E402

PEAK_BYTES_PER_S = 3.02e12  # H100 device-to-device copy, bytes read + written
BLOCK_SIZE = 16


@dataclass
class Shapes:
    models: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {"qwen3-0.6b": (16, 8), "llama-3.1-8b": (32, 8)}  # (Hq, Hk)
    )
    head_dim: int = 128
    max_model_len: int = 4096  # block table width = max_model_len / BLOCK_SIZE, as the engine sizes it
    decode_batches: list[int] = field(default_factory=lambda: [1, 8, 32, 64, 128, 256])
    decode_contexts: list = field(default_factory=lambda: [512, 1024, 2048, "mixed"])  # mixed: random 512..2048
    mixed_range: tuple[int, int] = (512, 2048)
    ref_batches: tuple[int, ...] = (1, 64, 256)  # the torch reference is timed only at these
    prompts: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    chunk: tuple[int, int] = (2048, 2048)  # (chunk, cached prefix)
    mixed_prefill: tuple[int, int] | None = (2048, 200)  # (chunk, decodes beside it)
    multi_prompt: tuple[int, int] | None = (8, 1024)
    elementwise_tokens: tuple[int, ...] = (256, 8192)
    sampler_batches: tuple[int, ...] = (1, 64, 256)
    sampler_blocks: tuple[int, ...] = (1024, DEFAULT_BLOCK, 4096)  # the first row of each batch is the default
    vocab_size: int = 151936  # Qwen3
    hidden_sizes: tuple[int, ...] = (1024, 4096)
    intermediate_sizes: tuple[int, ...] = (3072, 14336)
    decode_sweep: list[tuple[str, int, int]] = field(
        default_factory=lambda: [("llama-3.1-8b", 256, 1024), ("qwen3-0.6b", 256, 1024), ("llama-3.1-8b", 8, 2048)]
    )
    prefill_sweep: tuple[str, int] = ("llama-3.1-8b", 8192)
    sweep_configs: int = 99  # how many configs of each sweep to try
    dtype: torch.dtype = torch.bfloat16
    copy_bytes: int = 1 << 30


QUICK = Shapes(decode_batches=[1, 8, 64, 256], decode_contexts=[1024], mixed_prefill=None, multi_prompt=None,
               sampler_blocks=(DEFAULT_BLOCK,))
SMOKE = Shapes(
    models={"tiny": (4, 2)}, head_dim=32, max_model_len=256, decode_batches=[3], decode_contexts=[40, "mixed"],
    mixed_range=(1, 100), ref_batches=(3,), prompts=[48], chunk=(20, 30), mixed_prefill=(20, 3), multi_prompt=(2, 24),
    elementwise_tokens=(5,), sampler_batches=(3,), sampler_blocks=(DEFAULT_BLOCK, 1024), vocab_size=3000, hidden_sizes=(64,), intermediate_sizes=(96,), decode_sweep=[("tiny", 2, 70)],
    prefill_sweep=("tiny", 40), sweep_configs=2, dtype=torch.float16 if not torch.cuda.is_available() else torch.bfloat16,
    copy_bytes=1 << 20,
)  # fmt: skip
SH = Shapes()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 rounds the softmax weights before P @ V; errors vs a float32 reference are expected near 3e-3.
ATTN_TOL = 1e-2
ELEMENTWISE_TOL = 1e-2

failures: list[str] = []
SWEEP_DEADLINE = float("inf")  # wall-clock time after which sweeps stop early (fresh machines spend most time compiling)


def bench_ms(fn) -> float:
    if DEVICE == "cpu":  # --smoke without a GPU: one interpreted run, wall clock
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def check(name: str, err: float, tol: float) -> str:
    if not err <= tol:
        failures.append(f"{name}: relative error {err:.2e} > {tol:.0e}")
        return f"{err:.1e} FAIL"
    return f"{err:.1e} ok"


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)] if rows else [len(h) for h in header]
    print(f"\n## {title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


def attention(args, max_query_len: int, out: torch.Tensor) -> torch.Tensor:
    """What the engine's dispatcher does on CUDA, called directly so that --smoke also runs Triton on CPU."""
    if max_query_len == 1:
        return paged_decode_attention(*args, out=out)
    return paged_prefill_attention(*args, out=out)


def make_problem(seq_lens: list[int], q_lens: list[int], hq: int, hk: int, gen: torch.Generator):
    """A paged problem with scattered random blocks; every cache slot holds random data (never zeros)."""
    batch = len(seq_lens)
    width = SH.max_model_len // BLOCK_SIZE
    needed = [-(-s // BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(needed) + 16
    perm = torch.randperm(num_blocks, generator=gen, device=DEVICE).to(torch.int32)
    table_ = torch.randint(0, num_blocks, (batch, width), generator=gen, device=DEVICE, dtype=torch.int32)
    start = 0
    for i, n in enumerate(needed):
        table_[i, :n] = perm[start : start + n]
        start += n
    d = SH.head_dim
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, hk, d, generator=gen, device=DEVICE).to(SH.dtype)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, hk, d, generator=gen, device=DEVICE).to(SH.dtype)
    q = torch.randn(sum(q_lens), hq, d, generator=gen, device=DEVICE).to(SH.dtype)
    qsl = torch.zeros(batch + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, table_, seq_lens_t, qsl.to(DEVICE), d**-0.5


def float32_reference(args, seqs_per_chunk: int = 32) -> torch.Tensor:
    """The torch reference on float32 copies, a few sequences at a time (it materializes K/V per query head)."""
    q, k, v, table_, seq_lens, qsl, scale = args
    k32, v32 = k.float(), v.float()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    starts = qsl.tolist()
    for s in range(0, len(starts) - 1, seqs_per_chunk):
        e = min(s + seqs_per_chunk, len(starts) - 1)
        rows = slice(starts[s], starts[e])
        out[rows] = paged_attention_ref(q[rows].float(), k32, v32, table_[s:e], seq_lens[s:e], qsl[s : e + 1] - starts[s],
                                        scale)  # fmt: skip
    return out


def kv_bytes(seq_lens: list[int], hk: int) -> int:
    """K and V of every cached token, read once."""
    return sum(seq_lens) * hk * SH.head_dim * 2 * SH.dtype.itemsize


def fmt_config(c) -> str:
    if isinstance(c, DecodeConfig):
        return f"{c.tile_n}/{c.num_warps}/{c.num_stages}"
    return f"{c.block_m}/{c.tile_n}/{c.num_warps}/{c.num_stages}"


# --------------------------------------------------------------------------------------------------------- sections


def section_copy_ceiling() -> None:
    src = torch.randn(SH.copy_bytes // 2, device=DEVICE).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    moved = 2 * src.numel() * src.element_size()
    got = moved / (ms * 1e-3)
    table("device-to-device copy (ceiling check)", ["bytes moved", "ms", "TB/s", "vs 3.02 TB/s"],
          [[f"{moved / 1e9:.2f} GB", f"{ms:.3f}", f"{got / 1e12:.2f}", f"{got / PEAK_BYTES_PER_S:.0%}"]])  # fmt: skip


def section_decode() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    for model, (hq, hk) in SH.models.items():
        for batch in SH.decode_batches:
            for ctx in SH.decode_contexts:
                if ctx == "mixed":
                    lo, hi = SH.mixed_range
                    seq_lens = torch.randint(lo, hi + 1, (batch,), generator=torch.Generator().manual_seed(batch))
                    seq_lens = seq_lens.tolist()
                else:
                    seq_lens = [ctx] * batch
                args = make_problem(seq_lens, [1] * batch, hq, hk, gen)
                out = torch.full_like(args[0], float("nan"))
                ms = bench_ms(lambda: attention(args, 1, out))
                out.fill_(float("nan"))
                attention(args, 1, out)
                err = rel_err(out, float32_reference(args))
                ref_ms = bench_ms(lambda: paged_attention_ref(*args)) if batch in SH.ref_batches else float("nan")
                gbs = kv_bytes(seq_lens, hk) / (ms * 1e-3)
                splits = decode_num_splits(batch, hk, args[3].shape[1], BLOCK_SIZE, num_sms(0 if DEVICE == "cuda" else None))
                rows.append([model, str(batch), str(ctx), str(splits), f"{ms * 1e3:.1f}", f"{gbs / 1e9:.0f}",
                             f"{gbs / PEAK_BYTES_PER_S:.0%}", f"{ref_ms * 1e3:.0f}", f"{ref_ms / ms:.1f}x",
                             check(f"decode {model} B={batch} ctx={ctx}", err, ATTN_TOL)])  # fmt: skip
                del args, out
    table(f"paged decode attention ({SH.dtype}, block {BLOCK_SIZE}, table width {SH.max_model_len // BLOCK_SIZE}): "
          "Triton vs torch reference; % peak = K/V bytes/s over 3.02 TB/s",
          ["model", "batch", "ctx", "splits", "us", "GB/s", "% peak", "ref us", "speedup", "rel err"], rows)  # fmt: skip


def section_decode_sweep() -> None:
    """Decode launch configurations at bandwidth-bound and latency-bound shapes; prints the best of each."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    configs = [DecodeConfig(tile_n=t, num_warps=w, num_stages=s)
               for t, w, s in [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 4, 2), (128, 8, 2),
                               (128, 8, 3)]][: SH.sweep_configs]  # fmt: skip
    rows = []
    for model, batch, ctx in SH.decode_sweep:
        if time.time() > SWEEP_DEADLINE:
            print(f"  decode sweep: skipping {model} B={batch} ctx={ctx} (time budget)")
            continue
        hq, hk = SH.models[model]
        args = make_problem([ctx] * batch, [1] * batch, hq, hk, gen)
        ref = float32_reference(args)
        results = []
        for config in configs:
            if time.time() > SWEEP_DEADLINE:
                print(f"  decode sweep: skipping the remaining configs for {model} B={batch} (time budget)")
                break
            out = torch.full_like(args[0], float("nan"))
            try:
                ms = bench_ms(lambda: paged_decode_attention(*args, out=out, config=config))
            except Exception as exc:  # a config that does not compile (e.g. shared memory) is skipped, not fatal
                print(f"  decode config {config} failed: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            results.append((ms, config))
            rows.append([f"{model} B={batch} ctx={ctx}", fmt_config(config), f"{ms * 1e3:.1f}",
                         f"{kv_bytes([ctx] * batch, hk) / (ms * 1e-3) / PEAK_BYTES_PER_S:.0%}",
                         check(f"decode sweep {model} B={batch} {config}", rel_err(out, ref), ATTN_TOL)])  # fmt: skip
        if results:
            best_ms, best = min(results, key=lambda r: r[0])
            default_ms = next((ms for ms, c in results if c == DECODE_CONFIG), float("nan"))
            rows.append([f"-> best for {model} B={batch}", fmt_config(best), f"{best_ms * 1e3:.1f}",
                         f"default {fmt_config(DECODE_CONFIG)}: {default_ms * 1e3:.1f} us", ""])  # fmt: skip
        del args
    table("decode config sweep (tile_n/num_warps/num_stages)", ["shape", "config", "us", "% peak", "rel err"], rows)


def _prefill_cases():
    """(label, seq_lens, q_lens): fresh prompts, a chunk after a cached prefix, a chunked-prefill mixed batch."""
    cases = [(f"prompt {t}", [t], [t]) for t in SH.prompts]
    chunk, prefix = SH.chunk
    cases.append((f"chunk {chunk} after {prefix} cached", [chunk + prefix], [chunk]))
    if SH.mixed_prefill:
        chunk, decodes = SH.mixed_prefill
        lo, hi = SH.mixed_range
        ctx = torch.randint(lo, hi + 1, (decodes,), generator=torch.Generator().manual_seed(3)).tolist()
        cases.append((f"chunk {chunk} + {decodes} decodes", [chunk] + ctx, [chunk] + [1] * decodes))
    if SH.multi_prompt:
        n, t = SH.multi_prompt
        cases.append((f"{n} prompts x {t}", [t] * n, [t] * n))
    return cases


def _causal_flops(seq_lens, q_lens, hq) -> float:
    visible = sum(q * (s - q) + q * (q + 1) // 2 for s, q in zip(seq_lens, q_lens))
    return 4.0 * hq * SH.head_dim * visible


def section_prefill() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    rows = []
    for model, (hq, hk) in SH.models.items():
        for label, seq_lens, q_lens in _prefill_cases():
            args = make_problem(seq_lens, q_lens, hq, hk, gen)
            out = torch.full_like(args[0], float("nan"))
            ms = bench_ms(lambda: attention(args, max(q_lens), out))
            out.fill_(float("nan"))
            attention(args, max(q_lens), out)
            err = rel_err(out, float32_reference(args))
            flops = _causal_flops(seq_lens, q_lens, hq)
            ref_ms = bench_ms(lambda: paged_attention_ref(*args))
            sdpa = ""
            if len(seq_lens) == 1 and seq_lens == q_lens:  # fresh prompt: torch SDPA (flash) on contiguous K/V
                t, d = q_lens[0], SH.head_dim
                qc = torch.randn(1, hq, t, d, device=DEVICE, generator=gen).to(SH.dtype)
                kc = torch.randn(1, hk, t, d, device=DEVICE, generator=gen).to(SH.dtype)
                vc = torch.randn_like(kc)
                sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=True))
                sdpa = f"{flops / (sdpa_ms * 1e-3) / 1e12:.0f}"
            config = pick_prefill_config(sum(q_lens), len(q_lens))
            rows.append([model, label, fmt_config(config), f"{ms * 1e3:.0f}", f"{flops / (ms * 1e-3) / 1e12:.0f}",
                         sdpa, f"{ref_ms * 1e3:.0f}", f"{ref_ms / ms:.1f}x",
                         check(f"prefill {model} {label}", err, ATTN_TOL)])  # fmt: skip
            del args, out
    table(f"paged prefill attention ({SH.dtype}, block {BLOCK_SIZE}): TFLOP/s of causal work; "
          "SDPA = torch flash attention on contiguous K/V (no paging), same FLOPs",
          ["model", "case", "config", "us", "TFLOP/s", "SDPA TFLOP/s", "ref us", "speedup", "rel err"], rows)  # fmt: skip


def section_prefill_sweep() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    model, t = SH.prefill_sweep
    hq, hk = SH.models[model]
    args = make_problem([t], [t], hq, hk, gen)
    ref = float32_reference(args)
    flops = _causal_flops([t], [t], hq)
    configs = [PrefillConfig(128, 64, 8, 2), PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 128, 8, 2),
               PrefillConfig(128, 64, 4, 2), PrefillConfig(64, 64, 4, 2), PrefillConfig(64, 64, 4, 3)]  # fmt: skip
    configs = configs[: SH.sweep_configs]
    rows, results = [], []
    for config in configs:
        if time.time() > SWEEP_DEADLINE:
            print("  prefill sweep: skipping the remaining configs (time budget)")
            break
        out = torch.full_like(args[0], float("nan"))
        try:
            ms = bench_ms(lambda: paged_prefill_attention(*args, out=out, config=config))
        except Exception as exc:
            print(f"  prefill config {config} failed: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        results.append((ms, config))
        rows.append([fmt_config(config), f"{ms * 1e3:.0f}", f"{flops / (ms * 1e-3) / 1e12:.0f}",
                     check(f"prefill sweep {config}", rel_err(out, ref), ATTN_TOL)])  # fmt: skip
    if results:
        best_ms, best = min(results, key=lambda r: r[0])
        rows.append([f"-> best {fmt_config(best)}", f"{best_ms * 1e3:.0f}", f"{flops / (best_ms * 1e-3) / 1e12:.0f}", ""])
    table(f"prefill config sweep, {model} prompt {t} (block_m/tile_n/num_warps/num_stages)",
          ["config", "us", "TFLOP/s", "rel err"], rows)  # fmt: skip


def section_elementwise() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    rows = []
    d = SH.head_dim

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, generator=gen).to(SH.dtype)

    def add(name, tokens, nbytes, run, run_ref, err):
        ms, ref_ms = bench_ms(run), bench_ms(run_ref)
        rows.append([name, str(tokens), f"{ms * 1e3:.1f}", f"{nbytes / (ms * 1e-3) / 1e9:.0f}", f"{ref_ms * 1e3:.1f}",
                     f"{ref_ms / ms:.1f}x", check(f"{name} T={tokens}", err, ELEMENTWISE_TOL)])  # fmt: skip

    hk = max(hk for _, hk in SH.models.values())
    for tokens in SH.elementwise_tokens:
        kv = randn(2, tokens // BLOCK_SIZE + 64, BLOCK_SIZE, hk, d)
        slots = torch.randperm(kv.shape[1] * BLOCK_SIZE, device=DEVICE, generator=gen)[:tokens]
        for hidden in SH.hidden_sizes:
            x, r, w = randn(tokens, hidden), randn(tokens, hidden), randn(hidden)
            ref_out, ref_r = rms_norm_ref(x.float(), w.float(), 1e-6, r.float())
            out, new_r = rms_norm_triton(x.clone(), w, 1e-6, r.clone())
            err = max(rel_err(out, ref_out), rel_err(new_r, ref_r))
            xb, rb = x.clone(), r.clone()
            add(f"add+rmsnorm H={hidden}", tokens, 4 * x.numel() * x.element_size(),
                lambda: rms_norm_triton(xb, w, 1e-6, rb), lambda: rms_norm_ref(x, w, 1e-6, r), err)  # fmt: skip

        for hq in sorted({hq for hq, _ in SH.models.values()}):
            fused = randn(tokens, hq + 2 * hk, d)
            q, kk = fused[:, :hq], fused[:, hq : hq + hk]
            positions = torch.randint(0, 8192, (tokens,), device=DEVICE, generator=gen)
            angles = torch.arange(8192, device=DEVICE)[:, None] * torch.rand(d // 2, device=DEVICE, generator=gen)
            cache = torch.cat((angles.cos(), angles.sin()), -1).float()

            # fused [q/k norm ->] rope -> cache write, against the composition of the torch references
            vv = fused[:, hq + hk :]
            qw, kw = randn(d), randn(d)
            for norm in (False, True):
                weights = (qw, kw) if norm else (None, None)
                q64 = attention_prep_ref(positions, q.double(), kk.double(), vv.double(), cache.double(),
                                         kv[0].double(), kv[1].double(), slots, *[w.double() if norm else None
                                                                                  for w in (qw, kw)])  # fmt: skip
                qc = q.clone()
                attention_prep_triton(positions, qc, kk, vv, cache, kv[0], kv[1], slots, *weights)
                err = rel_err(qc, q64)
                name = f"{'qknorm+' if norm else ''}rope+cache Hq={hq}"
                nbytes = (2 * hq + 4 * hk) * tokens * d * fused.element_size()
                add(name, tokens, nbytes,
                    lambda: attention_prep_triton(positions, qc, kk, vv, cache, kv[0], kv[1], slots, *weights),
                    lambda: attention_prep_ref(positions, q, kk, vv, cache, kv[0], kv[1], slots, *weights),
                    err)  # fmt: skip

        for inter in SH.intermediate_sizes:
            x = randn(tokens, 2 * inter)
            err = rel_err(silu_and_mul_triton(x), silu_and_mul_ref(x.float()))
            add(f"silu_and_mul I={inter}", tokens, 3 * tokens * inter * x.element_size(),
                lambda: silu_and_mul_triton(x), lambda: silu_and_mul_ref(x), err)  # fmt: skip
    table(f"elementwise kernels ({SH.dtype}): achieved GB/s (bytes read + written once), against the torch references",
          ["kernel", "tokens", "us", "GB/s", "ref us", "speedup", "rel err"], rows)  # fmt: skip


def section_sampler() -> None:
    """Random sampling of one decode step's float32 logits: the old path (temperature, softmax, Exp(1) noise,
    probs / noise, argmax: 5 kernels) against the fused Gumbel-max kernel, and the torch hash-noise reference
    (the fallback off CUDA). GB/s = the logits read once. The first block size of each batch is the default."""
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    noise_gen = torch.Generator(device=DEVICE).manual_seed(7)
    v = SH.vocab_size
    rows = []
    for n in SH.sampler_batches:
        logits = torch.randn(n, v, device=DEVICE, generator=gen) * 3
        temperature = 0.5 + torch.rand(n, device=DEVICE, generator=gen)
        keys = torch.randint(0, 2**32, (n,), device=DEVICE, generator=gen)
        steps = torch.randint(0, 4096, (n,), device=DEVICE, generator=gen)

        def old_path():
            probs = (logits / temperature[:, None]).softmax(-1)
            return (probs / torch.empty_like(probs).exponential_(generator=noise_gen)).argmax(-1)

        old_ms = bench_ms(old_path)
        scores = gumbel_scores_ref(logits, temperature, keys, steps)
        ref_ms = bench_ms(lambda: gumbel_scores_ref(logits, temperature, keys, steps).argmax(-1))
        top2 = scores.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3
        expected = scores.argmax(-1)
        del scores, top2
        blocks = sorted(set(SH.sampler_blocks), key=lambda b: b != DEFAULT_BLOCK)
        for block in blocks:
            ms = bench_ms(lambda: gumbel_argmax_triton(logits, temperature, keys, steps, block=block))
            tokens = gumbel_argmax_triton(logits, temperature, keys, steps, block=block)
            wrong = int((clear & (tokens != expected)).sum())
            gbs = n * v * 4 / (ms * 1e-3)
            splits = num_vocab_splits(n, v, block, 0 if DEVICE == "cuda" else None)
            rows.append([str(n), str(v), str(block), str(splits), f"{old_ms * 1e3:.1f}", f"{ms * 1e3:.1f}",
                         f"{gbs / 1e9:.0f}", f"{gbs / PEAK_BYTES_PER_S:.0%}", f"{old_ms / ms:.1f}x",
                         f"{ref_ms * 1e3:.0f}", f"{int(clear.sum())}/{n}",
                         check(f"sampler N={n} block={block} ({wrong} tokens differ)", 0.0 if wrong == 0 else float("inf"),
                               0.0)])  # fmt: skip
    table("sampling (float32 logits): old softmax + exponential race vs fused Gumbel-max kernel; "
          "'checked' = rows whose best two scores are > 1e-3 apart (must match the reference)",
          ["batch", "vocab", "block", "splits", "old us", "fused us", "GB/s", "% peak", "speedup", "torch ref us", "checked",
           "tokens"], rows)  # fmt: skip


def main() -> int:
    global SH, SWEEP_DEADLINE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes, no config sweeps")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script (CPU: interpreter)")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds after which config sweeps stop early")
    parser.add_argument("--only", default="", help="comma-separated section names to run (e.g. 'sampler')")
    opts = parser.parse_args()
    if DEVICE != "cuda" and not opts.smoke:
        print("kernels_bench.py needs a CUDA GPU (torch.cuda.is_available() is False); --smoke runs on CPU",
              file=sys.stderr)  # fmt: skip
        return 1
    SH = SMOKE if opts.smoke else QUICK if opts.quick else Shapes()
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    else:
        print(f"# CPU smoke run (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}): timings are meaningless")
    print(f"# default decode config {DECODE_CONFIG}")
    started = time.time()
    SWEEP_DEADLINE = started + opts.budget
    sections = [("copy ceiling", section_copy_ceiling), ("decode", section_decode), ("prefill", section_prefill),
                ("elementwise", section_elementwise), ("sampler", section_sampler)]  # fmt: skip
    if not opts.quick:
        sections += [("decode sweep", section_decode_sweep), ("prefill sweep", section_prefill_sweep)]
    if opts.only:
        wanted = {name.strip() for name in opts.only.split(",")}
        sections = [(name, fn) for name, fn in sections if name in wanted]
    crashed = []
    for name, fn in sections:
        t0 = time.time()
        try:
            fn()
        except Exception:
            traceback.print_exc()
            crashed.append(name)
        print(f"  ({name}: {time.time() - t0:.0f} s)")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"\n# total {time.time() - started:.0f} s")
    if failures or crashed:
        print(f"# FAILED: {len(failures)} correctness checks, sections raised: {crashed or 'none'}")
        for line in failures:
            print(f"#   {line}")
        return 1
    print("# all correctness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
