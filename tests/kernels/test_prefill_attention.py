"""Triton varlen prefill attention against the float64 torch reference.

Small shapes run everywhere (interpreted on CPU); ``gpu`` tests use real model shapes, bf16 included.
"""

from __future__ import annotations

import pytest
import torch

from kernels.prefill_attention import PREFILL_CONFIGS, PrefillConfig, paged_prefill_attention
from tests.kernels.kernel_testing import (
    BF16,
    F16,
    F32,
    ATTENTION_TOLERANCE,
    KERNEL_DEVICE,
    assert_close,
    poisoned_like,
    seeded_attention_problem,
)

# (q_lens, seq_lens, (Hq, Hk), head_dim, block_size, dtype, block_m)
PREFILL_CASES = [
    ([20, 1, 7], [20, 30, 40], (2, 2), 64, 16, F32, 16),  # fresh prompt, decode, chunk after a cached prefix
    ([33, 1, 64], [50, 1, 64], (4, 2), 128, 32, F16, 64),
    ([40, 0, 3], [100, 10, 3], (8, 2), 64, 16, F32, 128),  # a sequence with no query rows this step
    ([1, 1, 17], [17, 45, 49], (8, 1), 128, 16, F16, None),  # config picked by the dispatcher's rule
]


@pytest.mark.parametrize("q_lens, seq_lens, heads, head_dim, block_size, dtype, block_m", PREFILL_CASES)
def test_prefill_matches_reference(q_lens, seq_lens, heads, head_dim, block_size, dtype, block_m):
    problem = seeded_attention_problem(q_lens, seq_lens, heads, head_dim, block_size, dtype, seed=sum(seq_lens) + 1, strided_q=True)
    config = None if block_m is None else PrefillConfig(block_m=block_m, tile_n=32, num_warps=4, num_stages=2)
    out = poisoned_like(problem.q)
    paged_prefill_attention(*problem.args(), out=out, config=config)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[dtype], f"prefill block_m={block_m}")


def test_prefill_tile_alignment_every_residue():
    """Cached-prefix lengths 0..15 with 16-token query tiles put the tiles' first positions at every residue mod the
    32-key tile: the unmasked/masked tile boundary must be right at each of them."""
    contexts = list(range(16))
    problem = seeded_attention_problem([32] * 16, [32 + c for c in contexts], (1, 1), 16, 16, F32, seed=21)
    out = poisoned_like(problem.q)
    config = PrefillConfig(block_m=16, tile_n=32, num_warps=4, num_stages=2)
    paged_prefill_attention(*problem.args(), out=out, config=config)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[F32], "alignment sweep")


def test_prefill_kernel_on_decode_only_batch():
    problem = seeded_attention_problem([1, 1, 1], [9, 48, 70], (4, 1), 64, 16, F16, seed=3)
    out = poisoned_like(problem.q)
    paged_prefill_attention(*problem.args(), out=out)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[F16], "prefill kernel, q_len 1")


# ------------------------------------------------------------------------------------------------ real shapes, GPU

@pytest.mark.gpu
def test_gpu_prefill_long_chunk_every_config():
    problem = seeded_attention_problem([4096], [4096], (32, 8), 128, 16, BF16, seed=9, device="cuda")
    ref = problem.float64_reference()
    for _, config in PREFILL_CONFIGS:
        out = poisoned_like(problem.q)
        paged_prefill_attention(*problem.args(), out=out, config=config)
        assert_close(out, ref, ATTENTION_TOLERANCE[BF16], f"{config}")
