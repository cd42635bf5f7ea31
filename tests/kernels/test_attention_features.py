"""Sliding window, logit soft-capping and ALiBi in the Triton decode and prefill kernels, against the float64 torch
reference at random small shapes (interpreted on CPU), fp32 and fp16."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.decode_attention import DecodeConfig, paged_decode_attention
from kernels.paged_attention import paged_attention_ref
from kernels.prefill_attention import PrefillConfig, paged_prefill_attention
from tests.kernels.kernel_testing import KERNEL_DEVICE, TOLERANCE, assert_close, make_attention_problem, poisoned_like

F32, F16 = torch.float32, torch.float16


def _problem(q_lens, seq_lens, heads, head_dim, dtype, seed, block_size=16):
    gen = torch.Generator().manual_seed(seed)
    return make_attention_problem(q_lens, seq_lens, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                                  block_size=block_size, dtype=dtype, device=KERNEL_DEVICE, generator=gen)  # fmt: skip


def _reference(problem, **features):
    p = problem
    slopes = features.get("alibi_slopes")
    if slopes is not None:
        features = {**features, "alibi_slopes": slopes.double()}
    return paged_attention_ref(p.q.double(), p.k_cache.double(), p.v_cache.double(), p.block_tables, p.seq_lens,
                               p.query_start_loc, p.scale, **features)  # fmt: skip


def _slopes(num_heads: int) -> torch.Tensor:
    return torch.tensor([2 ** (-8 * (i + 1) / num_heads) for i in range(num_heads)], device=KERNEL_DEVICE)


FEATURES = {
    "window": dict(sliding_window=7),
    "window_long": dict(sliding_window=40),
    "softcap": dict(softcap=2.0),
    "window_softcap": dict(sliding_window=20, softcap=3.0),
    "alibi": "alibi",
}


def _features(name: str, num_q_heads: int) -> dict:
    spec = FEATURES[name]
    return dict(alibi_slopes=_slopes(num_q_heads)) if spec == "alibi" else dict(spec)


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("dtype", [F32, F16])
def test_decode_features_match_reference(feature, dtype):
    seq_lens = [1, 9, 33, 70, 130]
    problem = _problem([1] * len(seq_lens), seq_lens, (4, 2), 32, dtype, seed=len(feature))
    features = _features(feature, 4)
    ref = _reference(problem, **features)
    for splits in (1, 3):
        for fused in (True, False):
            out = poisoned_like(problem.q)
            config = DecodeConfig(tile_n=16, order="seq", fused_reduce=fused)
            paged_decode_attention(*problem.args(), out=out, num_splits=splits, config=config, **features)
            assert_close(out, ref, TOLERANCE[dtype], f"decode {feature} splits={splits} fused={fused}")


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("dtype", [F32, F16])
def test_prefill_features_match_reference(feature, dtype):
    # fresh prompts longer than the window, a chunk after a cached prefix, a decode row
    q_lens, seq_lens = [45, 1, 20, 9], [45, 50, 64, 9]
    problem = _problem(q_lens, seq_lens, (4, 1), 32, dtype, seed=3 + len(feature))
    features = _features(feature, 4)
    ref = _reference(problem, **features)
    for block_m in (16, 64):
        out = poisoned_like(problem.q)
        config = PrefillConfig(block_m=block_m, tile_n=16, num_warps=4, num_stages=2)
        paged_prefill_attention(*problem.args(), out=out, config=config, **features)
        assert_close(out, ref, TOLERANCE[dtype], f"prefill {feature} block_m={block_m}")


def test_reference_window_equals_truncated_context():
    """The reference's window is HF's: the last W positions, the query's own included."""
    problem = _problem([1], [30], (2, 2), 16, F32, seed=9)
    windowed = _reference(problem, sliding_window=5)
    keys = problem.k_cache[problem.block_tables[0, :2].long()].reshape(32, 2, 16)[25:30].double()
    values = problem.v_cache[problem.block_tables[0, :2].long()].reshape(32, 2, 16)[25:30].double()
    scores = torch.einsum("hd,shd->hs", problem.q[0].double(), keys) * problem.scale
    expected = torch.einsum("hs,shd->hd", scores.softmax(-1), values)
    assert torch.allclose(windowed[0], expected, atol=1e-10)


def test_reference_softcap_formula():
    problem = _problem([1], [12], (1, 1), 16, F32, seed=4)
    cap = 1.5
    out = _reference(problem, softcap=cap)
    keys = problem.k_cache[problem.block_tables[0, :1].long()].reshape(16, 1, 16)[:12, 0].double()
    values = problem.v_cache[problem.block_tables[0, :1].long()].reshape(16, 1, 16)[:12, 0].double()
    scores = keys @ problem.q[0, 0].double() * problem.scale
    weights = (cap * torch.tanh(scores / cap)).softmax(-1)
    assert torch.allclose(out[0, 0], weights @ values, atol=1e-10)
    assert not math.isclose(float((out[0, 0] - _reference(problem)[0, 0]).abs().max()), 0.0)
