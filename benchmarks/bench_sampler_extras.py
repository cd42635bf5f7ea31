"""Per-step cost of the sampling extras (issue 20): allowed_token_ids, bad_words and logprob_token_ids, against a
plain batch, at a decode batch's shape (Llama-3.1-8B's vocabulary, 128 rows). Run from the repository root on the
GPU:

    python benchmarks/bench_sampler_extras.py            # the table (build_sampling_batch host time + sampler time)
    python benchmarks/bench_sampler_extras.py --smoke    # tiny shapes; checks the script itself, also on CPU

Each case builds the step's ``SamplingBatch`` from real ``Sequence`` objects (host time, the per-step Python cost)
and runs the ``Sampler`` on random logits (device time, CUDA events, median of the repeats). The plain case is the
baseline: rows without the extras must cost what they cost before (the "plain" line is the same code path as
before the extras existed). Every case's sampled ids are checked: restricted rows only sample allowed ids, banned
ids never come out, requested logprobs equal the full log-softmax's. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.sampler import Sampler  # noqa: E402
from core.sampling_metadata import build_sampling_batch  # noqa: E402
from core.sequence import Sequence  # noqa: E402
from ipc.messages import SamplingParams  # noqa: E402


def make_case(name: str, rows: int, vocab: int, fraction: float) -> list[Sequence]:
    """``fraction`` of the rows use the case's feature; the others are plain temperature sampling."""
    seqs = []
    using = int(rows * fraction)
    for i in range(rows):
        extra: dict = {}
        if i < using and name == "allowed_token_ids":
            extra = dict(allowed_token_ids=list(range(i, vocab, max(1, vocab // 64)))[:64])
        elif i < using and name == "bad_words":
            extra = dict(bad_words_token_ids=[[7 + i % 5], [11, 13], [17, 19, 23]])
        elif i < using and name == "logprob_token_ids":
            extra = dict(logprobs=0, logprob_token_ids=[3, 5, 7, 9, vocab - 1])
        seq = Sequence(f"r{i}", [1, 2, 3, 11, 17, 19], SamplingParams(temperature=0.8, **extra),
                       eos_token_ids=frozenset(), max_model_len=4096)
        for token in (11, 17, 19):
            seq.append_token(token)
        seqs.append(seq)
    return seqs


def check(name: str, seqs: list[Sequence], logits: torch.Tensor, out) -> list[str]:
    errors = []
    tokens = out.token_ids.tolist()
    for i, seq in enumerate(seqs):
        p = seq.sampling_params
        if p.allowed_token_ids is not None and tokens[i] not in p.allowed_token_ids:
            errors.append(f"{name}: row {i} sampled {tokens[i]} outside its allowed ids")
        if p.bad_words_token_ids and tokens[i] in {w[0] for w in p.bad_words_token_ids if len(w) == 1}:
            errors.append(f"{name}: row {i} sampled a banned id {tokens[i]}")
        if p.logprob_token_ids:
            want = logits[i].float().log_softmax(-1)[p.logprob_token_ids]
            got = out.requested_logprobs[i, : len(p.logprob_token_ids)]
            if not torch.allclose(got.cpu(), want.cpu(), atol=1e-3):
                errors.append(f"{name}: row {i} requested logprobs differ from the log-softmax")
    return errors


def time_case(seqs, vocab, device, repeats: int) -> tuple[float, float, list[str], str]:
    sampler = Sampler()
    logits = torch.randn(len(seqs), vocab, device=device, dtype=torch.bfloat16 if device.type == "cuda" else
                         torch.float32)
    host, dev = [], []
    out = None
    for step in range(repeats + 2):
        t0 = time.perf_counter()
        batch = build_sampling_batch(seqs, vocab, device, [3] * len(seqs), step_key=step)
        t1 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = sampler(logits, batch)
            end.record()
            end.synchronize()
            dev_ms = start.elapsed_time(end)
        else:
            t2 = time.perf_counter()
            out = sampler(logits, batch)
            dev_ms = (time.perf_counter() - t2) * 1e3
        if step >= 2:  # warm-up steps left out
            host.append((t1 - t0) * 1e6)
            dev.append(dev_ms * 1e3)
    return statistics.median(host), statistics.median(dev), check("", seqs, logits, out), str(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few repeats (CPU is fine)")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rows, vocab, repeats = (8, 512, 3) if args.smoke else (args.rows, args.vocab, args.repeats)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"# sampler extras: {rows} rows, vocabulary {vocab}, {device}, median of {repeats} steps")
    print("| case | rows using it | build_sampling_batch (host us) | sampler (us) |")
    print("|---|---|---|---|")
    errors: list[str] = []
    for name in ("plain", "allowed_token_ids", "bad_words", "logprob_token_ids"):
        for fraction in ((0.0,) if name == "plain" else (1 / rows, 0.25, 1.0)):
            seqs = make_case(name, rows, vocab, fraction)
            host_us, dev_us, case_errors, _ = time_case(seqs, vocab, device, repeats)
            errors += [f"{name}@{fraction:.2f}: {e}" for e in case_errors]
            print(f"| {name} | {int(rows * fraction)} | {host_us:.1f} | {dev_us:.1f} |")
    for e in errors:
        print("CHECK FAILED:", e)
    print("# all correctness checks passed" if not errors else f"# {len(errors)} checks failed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
