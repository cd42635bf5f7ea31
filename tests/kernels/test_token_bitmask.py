"""The grammar-bitmask kernel against its torch reference and the per-token reference: exact -inf placement, only
the listed rows touched (interpreted on CPU at small vocabularies; compiled at Qwen3's vocabulary on a GPU)."""

from __future__ import annotations

import pytest
import torch

from core.structured_output.bitmask import apply_token_bitmask_reference
from kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref, apply_token_bitmask_triton
from tests.kernels.kernel_testing import KERNEL_DEVICE


def _problem(num_rows: int, vocab: int, rows: list[int], seed: int, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, vocab, generator=gen) * 3).to(dtype)
    words = -(-vocab // 32) + 1  # one spare word, as a padded buffer would have
    bitmask = torch.randint(-(2**31), 2**31, (len(rows), words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[0, 0] = -1  # all allowed
    bitmask[-1, 1:] = 0  # almost all banned
    return logits.to(device), torch.tensor(rows, dtype=torch.int64, device=device), bitmask.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab,rows,block", [(31, [0], 32), (100, [1, 3, 4], 64), (333, [4, 0, 2], 128),
                                               (1000, [5, 2], 4096)])
def test_triton_matches_reference(dtype, vocab, rows, block):
    logits, rows_t, bitmask = _problem(6, vocab, rows, seed=vocab, dtype=dtype, device=KERNEL_DEVICE)
    expected = apply_token_bitmask_reference(logits.cpu(), rows, bitmask.cpu())
    ref = apply_token_bitmask_ref(logits.clone(), rows_t, bitmask)
    got = apply_token_bitmask_triton(logits.clone(), rows_t, bitmask, block=block)
    assert torch.equal(ref.cpu(), expected)
    assert torch.equal(got.cpu(), expected)
    untouched = [r for r in range(6) if r not in rows]
    assert torch.equal(got[untouched].cpu(), logits[untouched].cpu())


def test_no_rows_is_a_no_op():
    logits = torch.randn(3, 40)
    empty = torch.empty(0, dtype=torch.int64)
    assert torch.equal(apply_token_bitmask(logits.clone(), empty, torch.empty(0, 2, dtype=torch.int32)), logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_at_qwen3_vocab(dtype):
    vocab = 151936
    rows = list(range(0, 256, 3))
    logits, rows_t, bitmask = _problem(256, vocab, rows, seed=1, dtype=dtype, device="cuda")
    ref = apply_token_bitmask_ref(logits.clone(), rows_t, bitmask)
    got = apply_token_bitmask(logits.clone(), rows_t, bitmask)
    assert torch.equal(got, ref)
