"""Head dims that are not powers of two (80: Phi-2 / StableLM, 96: Phi-3-mini, some Gemma variants) run in the
Triton decode and prefill kernels (a padded power-of-two block with masks), against the float64 reference, with the
poisoned output checked for writes outside the real head dims. Interpreted on CPU at small shapes, fp32 and fp16."""

from __future__ import annotations

import pytest
import torch

import kernels.paged_attention as pa
from kernels.attention_common import head_dim_block, triton_supports
from kernels.decode_attention import DecodeConfig, paged_decode_attention
from kernels.prefill_attention import PrefillConfig, paged_prefill_attention
from tests.kernels.kernel_testing import (
    ATTENTION_TOLERANCE, F16, F32, KERNEL_DEVICE, assert_close, poisoned_like, seeded_attention_problem,
)


def test_every_head_dim_runs_in_the_kernels():
    for head_dim in (8, 48, 64, 80, 96, 112, 128, 160, 256):
        q = torch.empty(3, 4, head_dim)
        cache = torch.empty(5, 16, 2, head_dim)
        assert triton_supports(q, cache), head_dim
    assert [head_dim_block(d) for d in (8, 64, 80, 96, 160)] == [16, 64, 128, 128, 256]


@pytest.mark.parametrize("head_dim", [80, 96])
@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("num_splits, fused", [(1, False), (3, True), (3, False)])
def test_decode_non_power_of_two_head_dims(head_dim, dtype, num_splits, fused):
    seq_lens = [1, 17, 40, 75]
    problem = seeded_attention_problem([1] * len(seq_lens), seq_lens, (4, 2), head_dim, 16, dtype, seed=head_dim,
                                       strided_q=True)  # fmt: skip
    wide = torch.full((len(seq_lens), 4, head_dim + 7), float("nan"), dtype=dtype, device=KERNEL_DEVICE)
    out = wide[..., :head_dim]  # a padded store would write the NaN columns past head_dim
    config = DecodeConfig(tile_n=16, order="seq", fused_reduce=fused)
    paged_decode_attention(*problem.args(), out=out, num_splits=num_splits, config=config)
    assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[dtype], f"decode D={head_dim}")
    assert torch.isnan(wide[..., head_dim:]).all(), "wrote past the head dim"


@pytest.mark.parametrize("head_dim", [80, 96])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_prefill_non_power_of_two_head_dims(head_dim, dtype):
    q_lens, seq_lens = [20, 1, 9], [20, 37, 30]  # fresh prompt, decode row, chunk after a cached prefix
    problem = seeded_attention_problem(q_lens, seq_lens, (4, 1), head_dim, 16, dtype, seed=head_dim + 1,
                                       strided_q=True)  # fmt: skip
    ref = problem.float64_reference()
    for block_m in (16, 64):
        wide = torch.full((sum(q_lens), 4, head_dim + 5), float("nan"), dtype=dtype, device=KERNEL_DEVICE)
        out = wide[..., :head_dim]
        config = PrefillConfig(block_m=block_m, tile_n=16, num_warps=4, num_stages=2)
        paged_prefill_attention(*problem.args(), out=out, config=config)
        assert_close(out, ref, ATTENTION_TOLERANCE[dtype], f"prefill D={head_dim} block_m={block_m}")
        assert torch.isnan(wide[..., head_dim:]).all(), "wrote past the head dim"


@pytest.mark.parametrize("head_dim", [80, 96])
def test_head_dims_with_window_and_softcap(head_dim):
    """The padded columns stay out of the shared masking path too (decode and prefill, window + soft-cap)."""
    from kernels.paged_attention import paged_attention_ref

    q_lens, seq_lens = [1, 1, 25], [33, 8, 40]
    problem = seeded_attention_problem(q_lens, seq_lens, (2, 1), head_dim, 16, F32, seed=head_dim + 2)
    features = dict(sliding_window=10, softcap=4.0)
    p = problem
    ref = paged_attention_ref(p.q.double(), p.k_cache.double(), p.v_cache.double(), p.block_tables, p.seq_lens,
                              p.query_start_loc, p.scale, **features)  # fmt: skip
    out = poisoned_like(p.q)
    paged_prefill_attention(*p.args(), out=out, config=PrefillConfig(16, 16, 4, 2), **features)
    assert_close(out, ref, ATTENTION_TOLERANCE[F32], "prefill window+softcap")
    decode = seeded_attention_problem([1, 1], [33, 8], (2, 1), head_dim, 16, F32, seed=head_dim + 3)
    ref = paged_attention_ref(decode.q.double(), decode.k_cache.double(), decode.v_cache.double(),
                              decode.block_tables, decode.seq_lens, decode.query_start_loc, decode.scale, **features)
    out = poisoned_like(decode.q)
    paged_decode_attention(*decode.args(), out=out, num_splits=2, config=DecodeConfig(tile_n=16), **features)
    assert_close(out, ref, ATTENTION_TOLERANCE[F32], "decode window+softcap")


def test_dispatcher_sends_head_dim_80_to_the_kernels(monkeypatch):
    """No reference fallback for D=80 on the kernel path: the dispatcher calls the Triton decode kernel."""
    problem = seeded_attention_problem([1, 1], [9, 30], (2, 2), 80, 16, F32, seed=5)
    ref = problem.float64_reference()
    calls = []
    real = pa.paged_decode_attention
    monkeypatch.setattr(pa, "paged_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(pa, "paged_attention_ref", lambda *a, **k: pytest.fail("fell back to the reference"))
    monkeypatch.setattr(pa, "use_triton", lambda tensor, backend: True)  # CPU tensors: the interpreter runs it
    out = poisoned_like(problem.q)
    pa.paged_attention(*problem.args(), max_query_len=1, out=out)
    assert calls == [1]
    assert_close(out, ref, ATTENTION_TOLERANCE[F32], "dispatched D=80")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [80, 96])
@pytest.mark.parametrize("max_query_len", [1, None])
def test_gpu_head_dims_bf16_real_shapes(head_dim, max_query_len):
    """Compiled, bf16, Phi-2-like heads (32 query heads; 32 or 8 KV heads), mixed lengths up to 2k, through the
    dispatcher (split-K decode at batch 3, one split at batch 64)."""
    gen = torch.Generator().manual_seed(head_dim)
    for batch, heads in ((3, (32, 32)), (64, (32, 8))):
        seq_lens = torch.randint(1, 2049, (batch,), generator=gen).tolist()
        q_lens = [1] * batch if max_query_len == 1 else [min(s, n) for s, n in zip(seq_lens, [1, 9, 200] * 22)]
        problem = seeded_attention_problem(q_lens, seq_lens, heads, head_dim, 16, torch.bfloat16, seed=batch,
                                           device="cuda")  # fmt: skip
        out = poisoned_like(problem.q)
        pa.paged_attention(*problem.args(), max_query_len=max_query_len, out=out)
        assert_close(out, problem.float64_reference(), ATTENTION_TOLERANCE[torch.bfloat16], f"D={head_dim} B={batch}")
