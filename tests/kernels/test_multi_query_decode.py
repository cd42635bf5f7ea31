"""The decode kernel with several query rows per sequence (speculative verify steps: the last token and its drafts)
against the float64 torch reference of the whole attention contract (``paged_attention_ref``, whose multi-row
sequences go through the per-sequence prefill reference), and the decode reference's own multi-query batch against it.

Small shapes, interpreted on CPU (``TRITON_INTERPRET=1``), compiled on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from core.cuda_graphs import capture_after_warmup
from kernels.attention_common import FP8_KV_DTYPE, quantize_kv_ref
from kernels.decode_attention import DecodeConfig, paged_decode_attention, paged_decode_attention_ref
from kernels.paged_attention import paged_attention, paged_attention_ref
from tests.kernels.kernel_testing import (
    ATTENTION_TOLERANCE,
    F16,
    F32,
    KERNEL_DEVICE,
    assert_close,
    poisoned_like,
    seeded_attention_problem,
)

UNFUSED = DecodeConfig(tile_n=16, num_warps=4, num_stages=2, order="seq", fused_reduce=False)
FUSED = DecodeConfig(tile_n=16, num_warps=4, num_stages=2, order="head", fused_reduce=True)
LPT = DecodeConfig(tile_n=32, num_warps=4, num_stages=2, order="lpt", fused_reduce=False)


def _reference(problem, **features) -> torch.Tensor:
    """The float64 reference of the whole contract, with the layer's attention features."""
    return paged_attention_ref(problem.q.double(), problem.k_cache.double(), problem.v_cache.double(),
                               problem.block_tables, problem.seq_lens, problem.query_start_loc, problem.scale,
                               **features)  # fmt: skip


# (queries, per-sequence query rows, seq_lens, (Hq, Hk), head_dim, block_size, dtype, num_splits, config):
# groups 1 / 3 / 4, sequences with fewer rows than ``queries`` (drafts not proposed) or none (a verify graph's
# padding), contexts on and across block and split edges, splits shorter than the query count.
CASES = [
    (1, [1, 1, 1], [1, 17, 50], (3, 1), 64, 16, F32, 1, UNFUSED),
    (2, [2, 1, 2], [2, 33, 40], (4, 4), 32, 16, F32, 1, UNFUSED),
    (4, [4, 4, 2, 0], [4, 70, 19, 0], (3, 1), 64, 16, F16, 3, UNFUSED),
    (4, [4, 3, 4], [100, 9, 64], (8, 2), 64, 16, F32, 4, FUSED),
    (6, [6, 6], [6, 130], (9, 3), 64, 16, F16, 1, UNFUSED),
    (6, [6, 1, 6, 4], [200, 7, 66, 35], (9, 3), 64, 16, F32, 8, FUSED),
    (6, [6, 5, 6], [300, 48, 97], (9, 3), 64, 16, F16, 5, UNFUSED),
    (6, [6, 6, 0, 2], [129, 50, 0, 3], (4, 1), 32, 16, F32, 4, FUSED),
    (6, [6, 3, 6], [150, 90, 12], (12, 3), 64, 32, F16, 1, LPT),
    # k = 15 at SmolLM2's group of 3: 48 (query, head) rows, the 64-row tile
    (16, [16, 9, 16], [16, 40, 95], (9, 3), 64, 16, F32, 1, UNFUSED),
    (16, [16, 0, 11], [200, 0, 30], (9, 3), 64, 16, F16, 4, FUSED),
]


@pytest.mark.parametrize("queries, q_lens, seq_lens, heads, head_dim, block_size, dtype, num_splits, config", CASES)
def test_multi_query_decode_matches_reference(queries, q_lens, seq_lens, heads, head_dim, block_size, dtype,
                                              num_splits, config):  # fmt: skip
    problem = seeded_attention_problem(q_lens, seq_lens, heads, head_dim, block_size, dtype, seed=sum(seq_lens))
    out = poisoned_like(problem.q)
    result = paged_decode_attention(*problem.args(), out=out, num_splits=num_splits, config=config, queries=queries)
    assert result is out
    assert_close(out, _reference(problem), ATTENTION_TOLERANCE[dtype],
                 f"Q={queries} splits={num_splits} fused={config.fused_reduce}")  # fmt: skip


@pytest.mark.parametrize("num_splits, config", [(1, UNFUSED), (4, UNFUSED), (4, FUSED)])
@pytest.mark.parametrize("features", [
    dict(sliding_window=20),
    dict(sliding_window=5),  # narrower than the query count x group: early rows' windows end before later rows'
    dict(softcap=3.0),
    dict(sliding_window=24, softcap=2.0),
], ids=["window20", "window5", "softcap", "window+softcap"])
def test_multi_query_decode_features(num_splits, config, features):
    """Sliding window and soft-cap per (query, head) row: each row's window starts at its own position."""
    q_lens, seq_lens = [6, 4, 6], [140, 37, 6]
    problem = seeded_attention_problem(q_lens, seq_lens, (9, 3), 32, 16, F32, seed=11)
    out = poisoned_like(problem.q)
    paged_decode_attention(*problem.args(), out=out, num_splits=num_splits, config=config, queries=6, **features)
    assert_close(out, _reference(problem, **features), ATTENTION_TOLERANCE[F32], f"{features} splits={num_splits}")


def test_multi_query_decode_alibi():
    q_lens, seq_lens = [4, 2, 4], [90, 20, 41]
    problem = seeded_attention_problem(q_lens, seq_lens, (6, 2), 32, 16, F32, seed=5)
    slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(6)], device=KERNEL_DEVICE)
    for num_splits, config in [(1, UNFUSED), (3, FUSED)]:
        out = poisoned_like(problem.q)
        paged_decode_attention(*problem.args(), out=out, num_splits=num_splits, config=config, queries=4,
                               alibi_slopes=slopes)  # fmt: skip
        assert_close(out, _reference(problem, alibi_slopes=slopes), ATTENTION_TOLERANCE[F32], f"alibi {num_splits}")


@pytest.mark.parametrize("num_splits, config", [(1, UNFUSED), (3, FUSED)])
def test_multi_query_decode_fp8_cache(num_splits, config):
    """An fp8 cache, fp16 queries (the fp16-dots read path with V as pairs): against the reference on the same
    quantized cache."""
    q_lens, seq_lens = [5, 5, 2], [80, 33, 7]
    problem = seeded_attention_problem(q_lens, seq_lens, (6, 2), 64, 16, F16, seed=3)
    k_scale, v_scale = 0.02, 0.03
    problem.k_cache = quantize_kv_ref(problem.k_cache.float() * 0.1, k_scale, FP8_KV_DTYPE)
    problem.v_cache = quantize_kv_ref(problem.v_cache.float() * 0.1, v_scale, FP8_KV_DTYPE)
    out = poisoned_like(problem.q)
    paged_decode_attention(*problem.args(), out=out, num_splits=num_splits, config=config, queries=5,
                           k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    ref = paged_attention_ref(problem.q.double(), problem.k_cache, problem.v_cache, problem.block_tables,
                              problem.seq_lens, problem.query_start_loc, problem.scale, k_scale=k_scale,
                              v_scale=v_scale)  # fmt: skip
    assert_close(out, ref, ATTENTION_TOLERANCE[F16], "fp8 cache")


def test_fused_merge_counters_stay_zero_across_query_counts():
    """The fused merge's arrival counters are reset by each last arriver: Q = 6 then Q = 1 launches on one buffer."""
    import kernels.decode_attention as da

    problem = seeded_attention_problem([6, 6], [150, 70], (9, 3), 32, 16, F32, seed=2)
    first = paged_decode_attention(*problem.args(), num_splits=4, config=FUSED, queries=6)
    again = paged_decode_attention(*problem.args(), num_splits=4, config=FUSED, queries=6)
    assert torch.equal(first, again)
    assert int(da._SPLIT_COUNTERS[problem.q.device].abs().sum()) == 0


@pytest.mark.parametrize("sliding_window, softcap", [(0, 0.0), (7, 0.0), (0, 2.5)])
def test_decode_reference_batches_multi_query_sequences(sliding_window, softcap):
    """The decode reference's padded multi-query batch equals the per-sequence reference; sequences with more rows
    than ``queries`` are left alone."""
    q_lens, seq_lens = [3, 1, 3, 5], [40, 9, 3, 30]
    problem = seeded_attention_problem(q_lens, seq_lens, (4, 2), 16, 16, F32, seed=9, device="cpu")
    features = dict(sliding_window=sliding_window, softcap=softcap)
    out = torch.zeros_like(problem.q)
    paged_decode_attention_ref(*problem.args(), out=out, queries=3, **features)
    ref = paged_attention_ref(*problem.args(), **features)
    assert torch.allclose(out[:7], ref[:7], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[7:], torch.zeros_like(out[7:]))  # the 5-row sequence is not a 3-query decode


def test_dispatcher_routes_multi_query_steps_and_checks_the_layout():
    """``decode_queries`` sends a step to the multi-query decode path (the reference on CPU tensors; the kernel on
    CUDA), same result as the varlen path; a step whose rows exceed it is refused."""
    problem = seeded_attention_problem([4, 2, 4], [30, 20, 4], (6, 2), 32, 16, F32, seed=4, device="cpu")
    varlen = paged_attention(*problem.args(), max_query_len=4)
    routed = paged_attention(*problem.args(), max_query_len=4, decode_queries=4)
    assert torch.allclose(routed, varlen, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="decode_queries"):
        paged_attention(*problem.args(), max_query_len=4, decode_queries=3)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_gpu_verify_graph_replays_match_eager_and_reference(batch):
    """SmolLM2-135M shapes in bf16 (9 query / 3 KV heads, head dim 64, 1 + 5 query rows): the engine's default
    configs (split-K with the fused merge at small batches), captured once and replayed on new lengths, tables and
    per-sequence row counts (fewer drafts, padding sequences): bit-identical to eager, counters back at zero, close to
    the float64 reference."""
    import kernels.decode_attention as da
    from kernels.decode_attention import decode_order_host

    queries, heads, dtype = 6, (9, 3), torch.bfloat16
    problem = seeded_attention_problem([queries] * batch, [1600] * batch, heads, 64, 16, dtype, seed=batch,
                                       device="cuda", extra_table_columns=16)  # fmt: skip
    q, k_cache, v_cache, tables, seq_lens, qsl, scale = problem.args()
    order = torch.arange(batch, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def call():
        return paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale, out=out, max_query_len=queries,
                               decode_queries=queries, decode_order=order)  # fmt: skip

    graph = capture_after_warmup(call)  # the warm-up allocates the split counters outside the capture
    gen = torch.Generator().manual_seed(5)
    for step in range(12):
        rows = torch.randint(0, queries + 1, (batch,), generator=gen, dtype=torch.int32)
        rows[step % batch] = queries
        new_lens = torch.randint(queries, 1700, (batch,), generator=gen, dtype=torch.int32)
        new_lens[rows == 0] = 0  # a padding sequence: no rows, no context
        new_starts = torch.zeros(batch + 1, dtype=torch.int32)
        new_starts[1:] = torch.cumsum(rows, 0)
        seq_lens.copy_(new_lens)
        qsl.copy_(new_starts)
        tables.copy_(torch.randint(0, k_cache.shape[0], tables.shape, generator=gen, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen).to(dtype))
        order.copy_(torch.from_numpy(decode_order_host(new_lens.numpy())))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale, seq_order=order,
                                       queries=queries)  # fmt: skip
        live = int(new_starts[-1])
        assert torch.equal(out[:live], eager[:live]), f"replay {step} differs from eager"
        assert int(da._SPLIT_COUNTERS[out.device].abs().sum()) == 0
        ref = paged_attention_ref(q.double(), k_cache.double(), v_cache.double(), tables, seq_lens, qsl, scale)
        assert_close(out[:live], ref[:live], ATTENTION_TOLERANCE[dtype], f"replay {step}")
