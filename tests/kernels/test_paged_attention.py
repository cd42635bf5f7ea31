"""Triton paged attention (decode split-K and varlen prefill) against the float64 torch reference.

Small shapes run everywhere (interpreted on CPU); ``gpu`` tests use real model shapes, bf16 included.
"""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import (
    PrefillConfig,
    decode_num_splits,
    paged_attention,
    paged_decode_attention,
    paged_prefill_attention,
)
from tests.kernels.kernel_testing import (
    ATTENTION_TOLERANCE,
    KERNEL_DEVICE,
    assert_close,
    make_attention_problem,
    poisoned_like,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _problem(q_lens, seq_lens, heads, head_dim, block_size, dtype, seed, device=KERNEL_DEVICE, **kw):
    gen = torch.Generator().manual_seed(seed)
    return make_attention_problem(
        q_lens, seq_lens, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim, block_size=block_size,
        dtype=dtype, device=device, generator=gen, **kw,
    )  # fmt: skip


# (seq_lens, (Hq, Hk), head_dim, block_size, dtype, num_splits): GQA 1/2/4/8, lengths on and across block edges.
DECODE_CASES = [
    ([1, 16, 17, 50], (2, 2), 64, 16, F32, 1),
    ([31, 32, 33, 100], (4, 2), 128, 32, F16, 3),
    ([200, 7], (4, 1), 64, 16, F32, 8),  # the short sequence leaves most splits empty
    ([65, 1, 130], (8, 1), 64, 32, F16, 4),
]


@pytest.mark.parametrize("seq_lens, heads, head_dim, block_size, dtype, num_splits", DECODE_CASES)
def test_decode_matches_reference(seq_lens, heads, head_dim, block_size, dtype, num_splits):
    problem = _problem([1] * len(seq_lens), seq_lens, heads, head_dim, block_size, dtype, seed=sum(seq_lens))
    out = poisoned_like(problem.q)
    result = paged_decode_attention(*problem.args(), out=out, num_splits=num_splits)
    assert result is out
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[dtype], f"decode splits={num_splits}")


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_strided_views_and_padding_rows(num_splits):
    """q sliced out of a fused qkv tensor, out a view of a wider buffer, and graph-padding rows with seq_len 0."""
    problem = _problem([1] * 4, [40, 1, 23, 9], (4, 2), 64, 16, F32, seed=7, strided_q=True)
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


# (q_lens, seq_lens, (Hq, Hk), head_dim, block_size, dtype, block_m)
PREFILL_CASES = [
    ([20, 1, 7], [20, 30, 40], (2, 2), 64, 16, F32, 16),  # fresh prompt, decode, chunk after a cached prefix
    ([33, 1, 64], [50, 1, 64], (4, 2), 128, 32, F16, 64),
    ([40, 0, 3], [100, 10, 3], (8, 2), 64, 16, F32, 128),  # a sequence with no query rows this step
    ([1, 1, 17], [17, 45, 49], (8, 1), 128, 16, F16, None),  # config picked by the dispatcher's rule
]


@pytest.mark.parametrize("q_lens, seq_lens, heads, head_dim, block_size, dtype, block_m", PREFILL_CASES)
def test_prefill_matches_reference(q_lens, seq_lens, heads, head_dim, block_size, dtype, block_m):
    problem = _problem(q_lens, seq_lens, heads, head_dim, block_size, dtype, seed=sum(seq_lens) + 1, strided_q=True)
    config = None if block_m is None else PrefillConfig(block_m=block_m, tile_n=32, num_warps=4, num_stages=2)
    out = poisoned_like(problem.q)
    paged_prefill_attention(*problem.args(), out=out, config=config)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[dtype], f"prefill block_m={block_m}")


def test_prefill_tile_alignment_every_residue():
    """Cached-prefix lengths 0..15 with 16-token query tiles put the tiles' first positions at every residue mod the
    32-key tile: the unmasked/masked tile boundary must be right at each of them."""
    contexts = list(range(16))
    problem = _problem([32] * 16, [32 + c for c in contexts], (1, 1), 16, 16, F32, seed=21)
    out = poisoned_like(problem.q)
    config = PrefillConfig(block_m=16, tile_n=32, num_warps=4, num_stages=2)
    paged_prefill_attention(*problem.args(), out=out, config=config)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[F32], "alignment sweep")


def test_prefill_kernel_on_decode_only_batch():
    problem = _problem([1, 1, 1], [9, 48, 70], (4, 1), 64, 16, F16, seed=3)
    out = poisoned_like(problem.q)
    paged_prefill_attention(*problem.args(), out=out)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[F16], "prefill kernel, q_len 1")


def test_dispatcher_on_cpu_uses_reference_and_fills_out():
    problem = _problem([2, 1], [5, 20], (4, 2), 16, 16, F32, seed=11, device="cpu")
    out = poisoned_like(problem.q)
    result = paged_attention(*problem.args(), max_query_len=2, out=out)
    assert result is out
    assert_close(out, problem.float64_reference(), 1e-5, "cpu dispatcher")
    positional = paged_attention(*problem.args())
    assert torch.equal(positional, out)


# ------------------------------------------------------------------------------------------------ real shapes, GPU

MODEL_HEADS = {"qwen3-0.6b": (16, 8), "llama-3.1-8b": (32, 8)}


@pytest.mark.gpu
@pytest.mark.parametrize("model", sorted(MODEL_HEADS))
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("batch", [1, 7, 64, 256])
@pytest.mark.parametrize("block_size", [16, 32])
def test_gpu_decode_real_shapes(model, dtype, batch, block_size):
    gen = torch.Generator().manual_seed(batch * 31 + block_size)
    seq_lens = torch.randint(1, 2049, (batch,), generator=gen).tolist()
    problem = _problem([1] * batch, seq_lens, MODEL_HEADS[model], 128, block_size, dtype, seed=batch, device="cuda",
                       extra_table_columns=4096 // block_size)  # fmt: skip
    out = poisoned_like(problem.q)
    paged_attention(*problem.args(), max_query_len=1, out=out)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[dtype], f"{model} decode B={batch}")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_gpu_decode_head_dims_and_fp32(head_dim, dtype):
    seq_lens = [1, 15, 16, 17, 511, 512, 513, 1500]
    problem = _problem([1] * 8, seq_lens, (32, 4), head_dim, 16, dtype, seed=head_dim, device="cuda")
    for splits in (1, 5, 16):
        out = poisoned_like(problem.q)
        paged_decode_attention(*problem.args(), out=out, num_splits=splits)
        assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[dtype], f"splits={splits}")


@pytest.mark.gpu
@pytest.mark.parametrize("model", sorted(MODEL_HEADS))
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_gpu_prefill_mixed_real_shapes(model, dtype, block_size):
    """A chunked-prefill step: a long chunk after a cached prefix, fresh prompts, and a crowd of decodes."""
    gen = torch.Generator().manual_seed(block_size)
    decode_ctx = torch.randint(2, 1500, (40,), generator=gen).tolist()
    q_lens = [1500, 300, 77] + [1] * 40
    seq_lens = [2000, 300, 77] + decode_ctx
    problem = _problem(q_lens, seq_lens, MODEL_HEADS[model], 128, block_size, dtype, seed=5, device="cuda",
                       strided_q=True)  # fmt: skip
    out = poisoned_like(problem.q)
    paged_attention(*problem.args(), max_query_len=problem.max_query_len, out=out)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[dtype], f"{model} mixed prefill")


@pytest.mark.gpu
def test_gpu_prefill_long_chunk_every_config():
    from kernels.paged_attention import PREFILL_CONFIGS

    problem = _problem([4096], [4096], (32, 8), 128, 16, BF16, seed=9, device="cuda")
    ref = problem.float64_reference()
    for _, config in PREFILL_CONFIGS:
        out = poisoned_like(problem.q)
        paged_prefill_attention(*problem.args(), out=out, config=config)
        assert_close(out, ref, ATTENTION_TOLERANCE[BF16], f"{config}")


@pytest.mark.gpu
def test_gpu_decode_replays_in_cuda_graph():
    """Captured once, replayed on new lengths and block tables written into the same buffers: same results as eager."""
    batch, heads, block_size, dtype = 32, (16, 8), 16, BF16
    first = _problem([1] * batch, [700] * batch, heads, 128, block_size, dtype, seed=1, device="cuda",
                     extra_table_columns=64)  # fmt: skip
    q, k_cache, v_cache, tables, seq_lens, qsl, scale = first.args()
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale, max_query_len=1, out=out)  # compile
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale, max_query_len=1, out=out)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        new_lens = torch.randint(0, 1600, (batch,), generator=gen, dtype=torch.int32)
        new_lens[0] = 1600
        num_blocks = k_cache.shape[0]
        seq_lens.copy_(new_lens)
        tables.copy_(torch.randint(0, num_blocks, tables.shape, generator=gen, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen).to(dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale, max_query_len=1)
        assert torch.equal(out, eager)
        live = new_lens > 0
        ref = paged_attention(q.double(), k_cache.double(), v_cache.double(), tables, seq_lens, qsl, scale,
                              backend="torch")  # fmt: skip
        assert_close(out[live.cuda()], ref[live.cuda()], ATTENTION_TOLERANCE[dtype], "graph replay")
