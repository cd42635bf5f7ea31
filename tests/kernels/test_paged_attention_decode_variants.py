"""Decode attention variants (launch order, split-K merge, tile/pipelining configs) against the float64 reference.

Every entry of ``DECODE_VARIANTS`` must compute the same function: small shapes run everywhere (interpreted on CPU),
``gpu`` tests use real model shapes and CUDA graphs (where a missing memory-ordering guarantee would show).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import kernels.paged_attention as pa
from kernels.paged_attention import (
    DECODE_VARIANTS,
    DecodeConfig,
    decode_order,
    decode_order_host,
    paged_attention,
    paged_decode_attention,
)
from tests.kernels.kernel_testing import (
    ATTENTION_TOLERANCE,
    KERNEL_DEVICE,
    assert_close,
    make_attention_problem,
    poisoned_like,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
VARIANTS = sorted(DECODE_VARIANTS)


def _problem(seq_lens, heads, head_dim, block_size, dtype, seed, device=KERNEL_DEVICE, **kw):
    gen = torch.Generator().manual_seed(seed)
    return make_attention_problem(
        [1] * len(seq_lens), seq_lens, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
        block_size=block_size, dtype=dtype, device=device, generator=gen, **kw,
    )  # fmt: skip


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


def test_fused_merge_leaves_counters_zero_and_repeats_exactly():
    """The last arriver resets its counter: a second launch on the same buffers gives bit-identical output."""
    config = DecodeConfig(order="seq", fused_reduce=True)
    problem = _problem([150, 90, 33, 1], (4, 2), 32, 16, F32, seed=8)
    first = paged_decode_attention(*problem.args(), num_splits=4, config=config)
    counters = pa._SPLIT_COUNTERS[first.device]
    assert int(counters.abs().sum()) == 0
    second = paged_decode_attention(*problem.args(), num_splits=4, config=config)
    assert torch.equal(first, second)
    assert_close(first, problem.float64_reference(), ATTENTION_TOLERANCE[F32], "fused merge")


def test_any_caller_order_gives_the_same_result():
    """The launch order is a schedule only: any permutation passed as ``seq_order`` computes the same outputs."""
    problem = _problem([70, 5, 130, 64, 1, 33], (4, 2), 32, 16, F32, seed=4)
    config = DecodeConfig(order="lpt", fused_reduce=True)
    ref = problem.float64_reference()
    gen = torch.Generator().manual_seed(0)
    for splits in (1, 3):
        perm = torch.randperm(6, generator=gen).to(torch.int32).to(KERNEL_DEVICE)
        out = poisoned_like(problem.q)
        paged_decode_attention(*problem.args(), out=out, num_splits=splits, config=config, seq_order=perm)
        assert_close(out, ref, ATTENTION_TOLERANCE[F32], f"permutation {perm.tolist()} splits={splits}")


def test_seq_order_must_be_int32_of_batch_size():
    problem = _problem([10, 20], (2, 2), 16, 16, F32, seed=1)
    config = DecodeConfig(order="lpt")
    with pytest.raises(ValueError, match="seq_order"):
        paged_decode_attention(*problem.args(), config=config, seq_order=torch.tensor([1, 0], device=KERNEL_DEVICE))
    with pytest.raises(ValueError, match="seq_order"):
        paged_decode_attention(*problem.args(), config=config,
                               seq_order=torch.tensor([1, 0, 2], dtype=torch.int32, device=KERNEL_DEVICE))  # fmt: skip


def test_dispatcher_accepts_decode_order():
    """On CUDA the order reaches the decode kernel; on CPU the dispatcher's reference ignores it."""
    problem = _problem([30, 60, 9], (4, 2), 32, 16, F32, seed=2)
    order = torch.tensor([1, 0, 2], dtype=torch.int32, device=KERNEL_DEVICE)
    out = paged_attention(*problem.args(), max_query_len=1, decode_order=order)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[F32], "dispatcher with decode_order")


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


def test_set_decode_variant_switches_the_default():
    before = pa.DECODE_CONFIG
    try:
        assert pa.set_decode_variant("baseline") is DECODE_VARIANTS["baseline"]
        assert pa.DECODE_CONFIG is DECODE_VARIANTS["baseline"]
    finally:
        pa.DECODE_CONFIG = before
    assert pa.DECODE_VARIANTS[pa.DEFAULT_DECODE_VARIANT] in DECODE_VARIANTS.values()


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


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["lpt-db32-fused", "lpt-db64-fused", "fused"])
@pytest.mark.parametrize("host_order", [False, True])
def test_gpu_graph_replays_fused_and_lpt(variant, host_order):
    """Captured once (split-K, fused merge, LPT order from the device sort or from a staged host permutation), replayed
    many times on new lengths and tables: bit-identical to eager every time (a memory-ordering race in the fused merge
    would show as a mismatch), counters back at zero, results right against the reference."""
    config = DECODE_VARIANTS[variant]
    batch, heads, dtype = 8, (32, 8), BF16
    problem = _problem([1000] * batch, heads, 128, 16, dtype, seed=3, device="cuda", extra_table_columns=64)
    q, k_cache, v_cache, tables, seq_lens, qsl, scale = problem.args()
    order = torch.arange(batch, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def call():
        return paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale, out=out, config=config,
                                      seq_order=order if host_order else None)  # fmt: skip

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compiles, allocates the split counters outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
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
        assert int(pa._SPLIT_COUNTERS[out.device].abs().sum()) == 0
        if step % 5 == 0:
            live = (new_lens > 0).cuda()
            ref = paged_attention(q.double(), k_cache.double(), v_cache.double(), tables, seq_lens, qsl, scale,
                                  backend="torch")  # fmt: skip
            assert_close(out[live], ref[live], ATTENTION_TOLERANCE[dtype], f"replay {step}")


@pytest.mark.gpu
def test_gpu_capture_without_counters_falls_back_to_the_reduce_kernel():
    """A graph captured before any eager call (no split counters yet) uses the separate reduce and stays right."""
    config = DECODE_VARIANTS["lpt-db32-fused"]
    problem = _problem([700, 30, 1200], (16, 8), 128, 16, BF16, seed=6, device="cuda")
    saved = dict(pa._SPLIT_COUNTERS)
    pa._SPLIT_COUNTERS.clear()
    try:
        out = torch.empty_like(problem.q)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            unfused = dataclasses.replace(config, fused_reduce=False)  # compiles what the capture will launch
            paged_decode_attention(*problem.args(), out=out, num_splits=4, config=unfused)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            paged_decode_attention(*problem.args(), out=out, num_splits=4, config=config)
        assert not pa._SPLIT_COUNTERS, "counters must not be allocated inside a capture"
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[BF16], "captured without counters")
    finally:
        pa._SPLIT_COUNTERS.update(saved)
