"""Host cost of the n-gram proposer per engine step: ``num_seqs`` sequences of ``context`` tokens, each appending
``tokens_per_step`` tokens per step (what a speculative step emits), the batched search over all of them.

    python -m benchmarks.ngram_host_cost --num-seqs 256 --context 1024
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from core.spec_decode.ngram import NgramProposer


def measure(num_seqs: int, context: int, k: int = 5, nmin: int = 2, nmax: int = 4, steps: int = 20,
            tokens_per_step: int = 3, vocab: int = 49152, seed: int = 0) -> float:
    """Mean seconds per step (sync of the new tokens + the search)."""
    rng = np.random.default_rng(seed)
    max_len = context + steps * tokens_per_step + 1
    proposer = NgramProposer(k, nmin, nmax, num_seqs, max_len)
    seqs = [(("r", i), rng.integers(0, vocab, context).tolist()) for i in range(num_seqs)]
    proposer.propose(seqs)
    start = time.perf_counter()
    for _ in range(steps):
        for _, tokens in seqs:
            tokens.extend(rng.integers(0, vocab, tokens_per_step).tolist())
        proposer.propose(seqs)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num-seqs", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--context", type=int, nargs="+", default=[512, 1024, 2048])
    args = p.parse_args(argv)
    for num_seqs in args.num_seqs:
        for context in args.context:
            print(f"num_seqs={num_seqs:4d} context={context:5d}: {measure(num_seqs, context) * 1e3:7.2f} ms/step")


if __name__ == "__main__":
    main()
