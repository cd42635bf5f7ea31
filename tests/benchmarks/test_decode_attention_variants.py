"""Every decode-attention variant the benchmark compares (benchmarks/decode_attention_variants.py) computes the same
function as the float64 reference: small shapes run everywhere (interpreted on CPU), ``gpu`` tests use real model
shapes."""

from __future__ import annotations

import pytest
import torch

import kernels.decode_attention as da
from benchmarks.decode_attention_variants import (
    DECODE_VARIANTS,
    DEFAULT_DECODE_VARIANT,
    SPLIT_DECODE_VARIANT,
    set_decode_variant,
)
from kernels.decode_attention import paged_decode_attention
from tests.kernels.kernel_testing import (
    ATTENTION_TOLERANCE,
    BF16,
    F16,
    F32,
    KERNEL_DEVICE,
    assert_close,
    poisoned_like,
    seeded_attention_problem,
)

VARIANTS = sorted(DECODE_VARIANTS)


def _problem(seq_lens, heads, head_dim, block_size, dtype, seed, device=KERNEL_DEVICE, **kw):
    return seeded_attention_problem([1] * len(seq_lens), seq_lens, heads, head_dim, block_size, dtype, seed, device,
                                    **kw)


# (seq_lens, (Hq, Hk), head_dim, block_size, dtype, num_splits): lengths across tile edges of 32 and 64, GQA 1/2/4.
CASES = [
    ([1, 31, 33, 64, 65, 130], (4, 2), 32, 16, F32, 1),
    ([200, 7, 1, 96], (4, 1), 32, 16, F16, 5),  # splits of 64 and 32 tokens; short sequences leave splits empty
    ([97, 3], (2, 2), 64, 32, F32, 8),
    ([300, 45, 129], (16, 1), 16, 16, F32, 8),  # group 16: the fused merge sums 2 splits at a time, 5 rounds
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seq_lens, heads, head_dim, block_size, dtype, num_splits", CASES)
def test_variant_matches_reference(variant, seq_lens, heads, head_dim, block_size, dtype, num_splits):
    problem = _problem(seq_lens, heads, head_dim, block_size, dtype, seed=sum(seq_lens) + num_splits)
    out = poisoned_like(problem.q)
    paged_decode_attention(*problem.args(), out=out, num_splits=num_splits, config=DECODE_VARIANTS[variant])
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[dtype], f"{variant} splits={num_splits}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_padding_rows_are_zero(variant):
    """Graph padding rows (seq_len 0) get zeros in every variant, also when split (the fused merge has no split to
    merge there), and live rows beside them stay right."""
    problem = _problem([40, 1, 23, 9], (4, 2), 32, 16, F32, seed=5)
    problem.seq_lens[1] = 0
    problem.seq_lens[3] = 0
    for splits in (1, 3):
        out = poisoned_like(problem.q)
        paged_decode_attention(*problem.args(), out=out, num_splits=splits, config=DECODE_VARIANTS[variant])
        live = torch.tensor([0, 2])
        assert_close(out[live], problem.float64_reference()[live], ATTENTION_TOLERANCE[F32], f"{variant} live rows")
        assert torch.equal(out[torch.tensor([1, 3])].cpu(), torch.zeros(2, 4, 32)), f"{variant} padding rows"


def test_set_decode_variant_switches_the_default():
    before = (da.DECODE_CONFIG, da.SPLIT_DECODE_CONFIG)
    try:
        assert set_decode_variant("baseline") is DECODE_VARIANTS["baseline"]
        assert da.DECODE_CONFIG is DECODE_VARIANTS["baseline"]
        assert da.SPLIT_DECODE_CONFIG is DECODE_VARIANTS["baseline"]  # for every batch size
    finally:
        da.set_decode_configs(*before)
    # the engine's defaults are the variants named as such here
    assert DECODE_VARIANTS[DEFAULT_DECODE_VARIANT] == da.DECODE_CONFIG
    assert DECODE_VARIANTS[SPLIT_DECODE_VARIANT] == da.SPLIT_DECODE_CONFIG


# ------------------------------------------------------------------------------------------------ real shapes, GPU

MODEL_HEADS = {"qwen3-0.6b": (16, 8), "llama-3.1-8b": (32, 8)}


@pytest.mark.gpu
@pytest.mark.parametrize("model", sorted(MODEL_HEADS))
@pytest.mark.parametrize("batch", [1, 8, 64, 256])
def test_gpu_every_variant_real_shapes(model, batch):
    """bf16, block 16, a 4096-token table, contexts 150..2000 beside a one-token one; the reference once for all."""
    gen = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(150, 2001, (batch,), generator=gen).tolist()
    seq_lens[0] = 1
    problem = _problem(seq_lens, MODEL_HEADS[model], 128, 16, BF16, seed=batch, device="cuda",
                       extra_table_columns=4096 // 16)  # fmt: skip
    ref = problem.float64_reference(seqs_per_chunk=16)
    for variant in VARIANTS:
        out = poisoned_like(problem.q)
        paged_decode_attention(*problem.args(), out=out, config=DECODE_VARIANTS[variant])
        assert_close(out, ref, ATTENTION_TOLERANCE[BF16], f"{variant} {model} B={batch}")
