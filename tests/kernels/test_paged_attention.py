"""The attention dispatcher: the reference off CUDA or with ``backend="torch"``, the decode kernel for decode-only
batches and the prefill kernel otherwise on CUDA (real shapes, mixed batches, CUDA-graph replay)."""

from __future__ import annotations

import pytest
import torch

from core.cuda_graphs import capture_after_warmup
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

def test_dispatcher_on_cpu_uses_reference_and_fills_out():
    problem = seeded_attention_problem([2, 1], [5, 20], (4, 2), 16, 16, F32, seed=11, device="cpu")
    out = poisoned_like(problem.q)
    result = paged_attention(*problem.args(), max_query_len=2, out=out)
    assert result is out
    assert_close(out, problem.float64_reference(), 1e-5, "cpu dispatcher")
    positional = paged_attention(*problem.args())
    assert torch.equal(positional, out)


def test_dispatcher_accepts_decode_order():
    """On CUDA the order reaches the decode kernel; on CPU the dispatcher's reference ignores it."""
    problem = seeded_attention_problem([1, 1, 1], [30, 60, 9], (4, 2), 32, 16, F32, seed=2)
    order = torch.tensor([1, 0, 2], dtype=torch.int32, device=KERNEL_DEVICE)
    out = paged_attention(*problem.args(), max_query_len=1, decode_order=order)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[F32], "dispatcher with decode_order")


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
    problem = seeded_attention_problem([1] * batch, seq_lens, MODEL_HEADS[model], 128, block_size, dtype, seed=batch, device="cuda",
                       extra_table_columns=4096 // block_size)  # fmt: skip
    out = poisoned_like(problem.q)
    paged_attention(*problem.args(), max_query_len=1, out=out)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[dtype], f"{model} decode B={batch}")


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
    problem = seeded_attention_problem(q_lens, seq_lens, MODEL_HEADS[model], 128, block_size, dtype, seed=5, device="cuda",
                       strided_q=True)  # fmt: skip
    out = poisoned_like(problem.q)
    paged_attention(*problem.args(), max_query_len=problem.max_query_len, out=out)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[dtype], f"{model} mixed prefill")


@pytest.mark.gpu
def test_gpu_decode_replays_in_cuda_graph():
    """Captured once, replayed on new lengths and block tables written into the same buffers: same results as eager."""
    batch, heads, block_size, dtype = 32, (16, 8), 16, BF16
    first = seeded_attention_problem([1] * batch, [700] * batch, heads, 128, block_size, dtype, seed=1, device="cuda",
                     extra_table_columns=64)  # fmt: skip
    q, k_cache, v_cache, tables, seq_lens, qsl, scale = first.args()
    out = torch.empty_like(q)
    graph = capture_after_warmup(
        lambda: paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale, max_query_len=1, out=out))
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
