"""Triton decode attention (split-K, fused or separate merge, launch orders) against the float64 reference.

Small shapes run everywhere (interpreted on CPU); ``gpu`` tests use real model shapes, bf16 included, and CUDA graphs
(where a missing memory-ordering guarantee in the fused merge would show).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from core.cuda_graphs import capture_after_warmup
import kernels.decode_attention as da
from kernels.decode_attention import (
    SPLIT_DECODE_CONFIG,
    DecodeConfig,
    decode_num_splits,
    decode_order,
    decode_order_host,
    paged_decode_attention,
)
from kernels.paged_attention import paged_attention
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


def _decode_problem(seq_lens, heads, head_dim, block_size, dtype, seed, device=KERNEL_DEVICE, **kw):
    return seeded_attention_problem([1] * len(seq_lens), seq_lens, heads, head_dim, block_size, dtype, seed, device,
                                    **kw)


# (seq_lens, (Hq, Hk), head_dim, block_size, dtype, num_splits): GQA 1/2/4/8, lengths on and across block edges.
DECODE_CASES = [
    ([1, 16, 17, 50], (2, 2), 64, 16, F32, 1),
    ([31, 32, 33, 100], (4, 2), 128, 32, F16, 3),
    ([200, 7], (4, 1), 64, 16, F32, 8),  # the short sequence leaves most splits empty
    ([65, 1, 130], (8, 1), 64, 32, F16, 4),
]


@pytest.mark.parametrize("seq_lens, heads, head_dim, block_size, dtype, num_splits", DECODE_CASES)
def test_decode_matches_reference(seq_lens, heads, head_dim, block_size, dtype, num_splits):
    problem = seeded_attention_problem([1] * len(seq_lens), seq_lens, heads, head_dim, block_size, dtype, seed=sum(seq_lens))
    out = poisoned_like(problem.q)
    result = paged_decode_attention(*problem.args(), out=out, num_splits=num_splits)
    assert result is out
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[dtype], f"decode splits={num_splits}")


@pytest.mark.parametrize("num_splits", [2, 4])  # two tiles a split, one
@pytest.mark.parametrize("window", [0, 70])
def test_split_decode_first_tile_before_the_wait_changes_no_bit(monkeypatch, num_splits, window):
    """``PRE_WAIT_KV``: a split's first tile of cached keys read before the PDL wait, the newest row after it, gives
    the bits of reading the tile after the wait (lengths on tile edges, a padding row, a sliding window)."""
    problem = seeded_attention_problem([1] * 5, [200, 7, 64, 65, 1], (4, 1), 64, 16, F16, seed=5)
    problem.seq_lens[4] = 0
    outs = []
    for pre_wait in (False, True):
        monkeypatch.setattr(da, "PRE_WAIT_KV", pre_wait)
        out = poisoned_like(problem.q)
        paged_decode_attention(*problem.args(), out=out, num_splits=num_splits, sliding_window=window)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    if not window:
        assert_close(outs[1][:4], problem.float64_reference()[:4], ATTENTION_TOLERANCE[F16], "pre-wait tile")


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_strided_views_and_padding_rows(num_splits):
    """q sliced out of a fused qkv tensor, out a view of a wider buffer, and graph-padding rows with seq_len 0."""
    problem = seeded_attention_problem([1] * 4, [40, 1, 23, 9], (4, 2), 64, 16, F32, seed=7, strided_q=True)
    problem.seq_lens[1] = 0  # padding row: no keys at all
    problem.seq_lens[3] = 0
    wide = torch.full((4, 6, 64), float("nan"), device=KERNEL_DEVICE)
    out = wide[:, 1:5]
    paged_decode_attention(*problem.args(), out=out, num_splits=num_splits)
    ref = problem.float64_reference()
    live = torch.tensor([0, 2])
    assert_close(out[live], ref[live], ATTENTION_TOLERANCE[F32], "live rows")
    assert torch.equal(out[torch.tensor([1, 3])].cpu(), torch.zeros(2, 4, 64)), "padding rows must be zeros"
    assert torch.isnan(wide[:, 0]).all() and torch.isnan(wide[:, 5]).all(), "wrote outside the out view"


def test_decode_default_split_count_is_static():
    """The split count depends on shapes only; big batches use one split (one launch)."""
    assert decode_num_splits(256, 8, 256, 16, 132) == 1
    assert decode_num_splits(64, 8, 256, 16, 132) == 1  # 512 programs already fill 132 SMs
    assert decode_num_splits(1, 8, 256, 16, 132) == 32
    assert decode_num_splits(1, 8, 4, 16, 132) == 1  # a 64-token table is never split
    assert 1 < decode_num_splits(16, 8, 256, 16, 132) <= 8


def test_fused_merge_leaves_counters_zero_and_repeats_exactly():
    """The last arriver resets its counter: a second launch on the same buffers gives bit-identical output."""
    config = DecodeConfig(order="seq", fused_reduce=True)
    problem = _decode_problem([150, 90, 33, 1], (4, 2), 32, 16, F32, seed=8)
    first = paged_decode_attention(*problem.args(), num_splits=4, config=config)
    counters = da._SPLIT_COUNTERS[first.device]
    assert int(counters.abs().sum()) == 0
    second = paged_decode_attention(*problem.args(), num_splits=4, config=config)
    assert torch.equal(first, second)
    assert_close(first, problem.float64_reference(), ATTENTION_TOLERANCE[F32], "fused merge")


@pytest.mark.parametrize("merge_chunk", [2, da.MERGE_CHUNK])
def test_fused_merge_in_several_chunks_matches_reference(monkeypatch, merge_chunk):
    """The merge's first chunk is read with every split's lse; later chunks in its loop: 2 rows a chunk (one split
    of a 2-head group) runs the loop over all 8 splits, the default reads them in one."""
    monkeypatch.setattr(da, "MERGE_CHUNK", merge_chunk)
    config = DecodeConfig(order="head", fused_reduce=True, tile_n=16)
    problem = _decode_problem([128, 70, 1], (4, 2), 32, 16, F32, seed=11)
    out = paged_decode_attention(*problem.args(), num_splits=8, config=config)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[F32], f"merge chunk {merge_chunk}")


def test_any_caller_order_gives_the_same_result():
    """The launch order is a schedule only: any permutation passed as ``seq_order`` computes the same outputs."""
    problem = _decode_problem([70, 5, 130, 64, 1, 33], (4, 2), 32, 16, F32, seed=4)
    config = DecodeConfig(order="lpt", fused_reduce=True)
    ref = problem.float64_reference()
    gen = torch.Generator().manual_seed(0)
    for splits in (1, 3):
        perm = torch.randperm(6, generator=gen).to(torch.int32).to(KERNEL_DEVICE)
        out = poisoned_like(problem.q)
        paged_decode_attention(*problem.args(), out=out, num_splits=splits, config=config, seq_order=perm)
        assert_close(out, ref, ATTENTION_TOLERANCE[F32], f"permutation {perm.tolist()} splits={splits}")


def test_seq_order_must_be_int32_of_batch_size():
    problem = _decode_problem([10, 20], (2, 2), 16, 16, F32, seed=1)
    config = DecodeConfig(order="lpt")
    with pytest.raises(ValueError, match="seq_order"):
        paged_decode_attention(*problem.args(), config=config, seq_order=torch.tensor([1, 0], device=KERNEL_DEVICE))
    with pytest.raises(ValueError, match="seq_order"):
        paged_decode_attention(*problem.args(), config=config,
                               seq_order=torch.tensor([1, 0, 2], dtype=torch.int32, device=KERNEL_DEVICE))  # fmt: skip


@pytest.mark.parametrize("lens", [[5, 9, 9, 0, 1, 9, 2], [0, 0, 0], [3], list(range(40, 0, -3)) + [7, 7, 7]])
def test_device_order_is_longest_first_and_matches_host(lens):
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=KERNEL_DEVICE)
    order = decode_order(seq_lens).cpu().numpy()
    host = decode_order_host(np.asarray(lens))
    assert order.dtype == np.int32 and host.dtype == np.int32
    assert sorted(order.tolist()) == list(range(len(lens)))
    assert order.tolist() == host.tolist()
    ordered = np.asarray(lens)[order]
    assert (np.diff(ordered) <= 0).all()
    for a, b in zip(order[:-1], order[1:]):  # ties keep batch order
        if lens[a] == lens[b]:
            assert a < b


# ------------------------------------------------------------------------------------------------ real shapes, GPU

@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_gpu_decode_head_dims_and_fp32(head_dim, dtype):
    seq_lens = [1, 15, 16, 17, 511, 512, 513, 1500]
    problem = seeded_attention_problem([1] * 8, seq_lens, (32, 4), head_dim, 16, dtype, seed=head_dim, device="cuda")
    for splits in (1, 5, 16):
        out = poisoned_like(problem.q)
        paged_decode_attention(*problem.args(), out=out, num_splits=splits)
        assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[dtype], f"splits={splits}")


# The engine's split config, and the longest-first fused merge with double-buffered tiles of 32 and 64 tokens.
GRAPH_CONFIGS = {
    "lpt-db32-fused": DecodeConfig(),
    "lpt-db64-fused": DecodeConfig(tile_n=64),
    "fused": SPLIT_DECODE_CONFIG,
}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(GRAPH_CONFIGS))
@pytest.mark.parametrize("host_order", [False, True])
def test_gpu_graph_replays_fused_and_lpt(variant, host_order):
    """Captured once (split-K, fused merge, LPT order from the device sort or from a staged host permutation), replayed
    many times on new lengths and tables: bit-identical to eager every time (a memory-ordering race in the fused merge
    would show as a mismatch), counters back at zero, results right against the reference."""
    config = GRAPH_CONFIGS[variant]
    batch, heads, dtype = 8, (32, 8), BF16
    problem = _decode_problem([1000] * batch, heads, 128, 16, dtype, seed=3, device="cuda", extra_table_columns=64)
    q, k_cache, v_cache, tables, seq_lens, qsl, scale = problem.args()
    order = torch.arange(batch, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def call():
        return paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale, out=out, config=config,
                                      seq_order=order if host_order else None)  # fmt: skip

    graph = capture_after_warmup(call)  # the warm-up allocates the split counters outside the capture
    gen = torch.Generator().manual_seed(11)
    for step in range(20):
        new_lens = torch.randint(0, 1700, (batch,), generator=gen, dtype=torch.int32)
        new_lens[step % batch] = 1700
        seq_lens.copy_(new_lens)
        tables.copy_(torch.randint(0, k_cache.shape[0], tables.shape, generator=gen, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen).to(dtype))
        order.copy_(torch.from_numpy(decode_order_host(new_lens.numpy())))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale, config=config)
        assert torch.equal(out, eager), f"replay {step} differs from eager"
        assert int(da._SPLIT_COUNTERS[out.device].abs().sum()) == 0
        if step % 5 == 0:
            live = (new_lens > 0).cuda()
            ref = paged_attention(q.double(), k_cache.double(), v_cache.double(), tables, seq_lens, qsl, scale,
                                  backend="torch")  # fmt: skip
            assert_close(out[live], ref[live], ATTENTION_TOLERANCE[dtype], f"replay {step}")


@pytest.mark.gpu
def test_gpu_capture_without_counters_falls_back_to_the_reduce_kernel():
    """A graph captured before any eager call (no split counters yet) uses the separate reduce and stays right."""
    config = DecodeConfig()  # longest first, tile 32, double-buffered, fused merge
    problem = _decode_problem([700, 30, 1200], (16, 8), 128, 16, BF16, seed=6, device="cuda")
    saved = dict(da._SPLIT_COUNTERS)
    da._SPLIT_COUNTERS.clear()
    try:
        out = torch.empty_like(problem.q)
        unfused = dataclasses.replace(config, fused_reduce=False)  # the warm-up compiles what the capture launches
        graph = capture_after_warmup(
            lambda: paged_decode_attention(*problem.args(), out=out, num_splits=4, config=config),
            lambda: paged_decode_attention(*problem.args(), out=out, num_splits=4, config=unfused))
        assert not da._SPLIT_COUNTERS, "counters must not be allocated inside a capture"
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[BF16], "captured without counters")
    finally:
        da._SPLIT_COUNTERS.update(saved)
