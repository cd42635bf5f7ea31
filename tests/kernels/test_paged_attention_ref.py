"""The torch reference itself against a naive float64 loop over sequences, tokens and heads."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_attention_ref
from tests.kernels.kernel_testing import make_attention_problem, relative_error


def naive_attention(problem) -> torch.Tensor:
    """Position by position through the block table; causal by the query's absolute position."""
    q = problem.q.double()
    out = torch.empty_like(q)
    k_cache, v_cache = problem.k_cache.double(), problem.v_cache.double()
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    starts = problem.query_start_loc.tolist()
    for i, seq_len in enumerate(problem.seq_lens.tolist()):
        q_len = starts[i + 1] - starts[i]
        table = problem.block_tables[i].tolist()
        keys = torch.stack([k_cache[table[p // block_size], p % block_size] for p in range(seq_len)])
        values = torch.stack([v_cache[table[p // block_size], p % block_size] for p in range(seq_len)])
        for j in range(q_len):
            pos = seq_len - q_len + j
            for h in range(q.shape[1]):
                kv = h // group
                scores = keys[: pos + 1, kv] @ q[starts[i] + j, h] * problem.scale
                weights = torch.softmax(scores, 0)
                out[starts[i] + j, h] = weights @ values[: pos + 1, kv]
    return out


@pytest.mark.parametrize(
    "q_lens, seq_lens, heads, block_size",
    [
        ([1, 1, 1], [1, 17, 40], (4, 2), 16),  # decode-only, across block boundaries
        ([5, 1, 20], [5, 33, 29], (4, 1), 16),  # mixed: fresh prefill, decode, chunk with a cached prefix
        ([3, 1, 0, 9], [35, 64, 12, 9], (2, 2), 32),  # a sequence with no query this step
    ],
)
def test_reference_matches_naive_loop(q_lens, seq_lens, heads, block_size):
    gen = torch.Generator().manual_seed(sum(seq_lens))
    problem = make_attention_problem(
        q_lens, seq_lens, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=16, block_size=block_size,
        dtype=torch.float32, device="cpu", generator=gen,
    )  # fmt: skip
    ref = paged_attention_ref(*problem.args())
    expected = naive_attention(problem)
    assert relative_error(ref, expected) < 1e-5
    assert relative_error(problem.float64_reference(), expected) < 1e-12
