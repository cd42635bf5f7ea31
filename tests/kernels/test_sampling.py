"""Fused Gumbel-max sampling: the hash noise bit for bit, the noise values, and the Triton kernel's tokens against the
torch reference (interpreted on CPU at small vocabularies; compiled at Qwen3's vocabulary on a GPU)."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from kernels.sampling import (
    _fast_log,
    _gumbel_from_bits_tl,
    gumbel_argmax,
    gumbel_argmax_ref,
    gumbel_argmax_triton,
    gumbel_from_bits_ref,
    gumbel_noise_ref,
    gumbel_noise_triton,
    gumbel_scores_ref,
    noise_bits_ref,
)
from tests.kernels.kernel_testing import KERNEL_DEVICE

QWEN3_VOCAB = 151936
CLEAR_GAP = 1e-3  # best-two score gap above which kernel and reference must agree (float rounding is ~1e-5 here)
EDGE_KEYS = [0, 1, 2**31, 2**32 - 1, 123456789, 0xDEADBEEF]
EDGE_STEPS = [0, 1, 2**32 - 1, 2**40 + 5, 17, 3]


def _problem(n: int, vocab: int, seed: int, device: str, greedy_rows=(), masked_rows=()):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen) * 3
    for row in masked_rows:  # a top-k-like row: all but 20 tokens at -inf
        keep = torch.randperm(vocab, generator=gen)[:20]
        masked = torch.full((vocab,), float("-inf"))
        masked[keep] = logits[row, keep]
        logits[row] = masked
    temperature = 0.3 + 1.7 * torch.rand(n, generator=gen)
    temperature[list(greedy_rows)] = 0.0
    keys = torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)
    steps = torch.randint(0, 5000, (n,), generator=gen, dtype=torch.int64)
    return tuple(t.to(device) for t in (logits, temperature, keys, steps))


def _assert_same_tokens(tokens: torch.Tensor, args, min_checked: int) -> None:
    """Equal to the reference on every row whose best two reference scores are more than CLEAR_GAP apart."""
    scores = gumbel_scores_ref(*args).double()
    top2 = scores.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > CLEAR_GAP
    expected = scores.argmax(-1)
    assert int(clear.sum()) >= min_checked, f"only {int(clear.sum())} rows with a clear winner"
    bad = torch.nonzero(clear & (tokens != expected)).flatten().tolist()
    assert not bad, f"rows {bad}: kernel {tokens[bad].tolist()} vs reference {expected[bad].tolist()}"


def _exact_gumbel(bits: torch.Tensor) -> torch.Tensor:
    """float64 ``-log(-log(u))``, ``u = (bits + 1/2) / 2^32``, with ``-log(u) = -log1p(-(1 - u))`` for exactness."""
    b = bits.double()
    u = (b + 0.5) / 2**32
    one_minus_u = (2**32 - b - 0.5) / 2**32
    e = torch.where(u <= 0.5, -torch.log(u), -torch.log1p(-one_minus_u))
    return -torch.log(e)


# ------------------------------------------------------------------------------------------------ the noise


def test_noise_bits_match_the_reference_bit_for_bit():
    keys = torch.tensor(EDGE_KEYS, dtype=torch.int64, device=KERNEL_DEVICE)
    steps = torch.tensor(EDGE_STEPS, dtype=torch.int64, device=KERNEL_DEVICE)
    bits, noise = gumbel_noise_triton(keys, steps, 3000)
    expected = noise_bits_ref(keys, steps, 3000)
    assert torch.equal(bits, expected)
    assert bits.min() >= 0 and bits.max() < 2**32
    torch.testing.assert_close(noise, gumbel_from_bits_ref(expected), atol=1e-5, rtol=0)


def test_noise_bits_match_a_hand_computed_hash():
    """Pins the hash itself (a refactor of the reference cannot silently change every seeded stream)."""
    m = 0xFFFFFFFF

    def fmix(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & m
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & m
        return x ^ (x >> 16)

    key, step, token = 0xDEADBEEF, 2**32 + 7, 151935
    k = fmix(key ^ fmix(((step & m) * 0x9E3779B9) & m))
    expected = fmix(fmix(k ^ ((token * 0x27D4EB2F) & m)) ^ k)
    bits = noise_bits_ref(torch.tensor([key]), torch.tensor([step]), token + 1)
    assert bits[0, token].item() == expected


def test_noise_changes_with_key_and_step_and_repeats():
    a = gumbel_noise_ref(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 64)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert torch.equal(a, gumbel_noise_ref(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 64))


def _edge_bits() -> torch.Tensor:
    edges = [0, 1, 2, 255, 2**24, 2**28 - 1, 2**28, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1,
             2**32 - 2**28 - 1, 2**32 - 2**28, 2**32 - 2**24, 2**32 - 257, 2**32 - 2, 2**32 - 1]  # fmt: skip
    random = torch.randint(0, 2**32, (4000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    return torch.cat([torch.tensor(edges, dtype=torch.int64), random])


def test_reference_gumbel_is_exact_to_float_rounding_at_both_ends():
    """u = 1 - 2^-33 must give a finite, large Gumbel (~22.9), not inf (E = 0) as a float32 u rounded to 1 would."""
    bits = _edge_bits()
    g = gumbel_from_bits_ref(bits)
    assert torch.isfinite(g).all() and g.min() > -3.2 and g.max() < 22.9
    exact = _exact_gumbel(bits)
    err = (g.double() - exact).abs()
    assert err.max() < 4e-6, (bits[err.argmax()].item(), g[err.argmax()].item(), exact[err.argmax()].item())
    assert g[bits == 2**32 - 1].item() == pytest.approx(33 * math.log(2), abs=1e-5)  # E = -log1p(-2^-33) ~ 2^-33
    assert g[bits == 0].item() == pytest.approx(-math.log(33 * math.log(2)), abs=1e-6)  # E = -log(2^-33)


@triton.jit
def _gumbel_of_bits_kernel(bits_ptr, out_ptr, n, BLOCK: tl.constexpr, FAST_LOG: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bits = tl.load(bits_ptr + offs, mask=offs < n, other=0).to(tl.uint32)
    tl.store(out_ptr + offs, _gumbel_from_bits_tl(bits, FAST_LOG), mask=offs < n)


def test_kernel_gumbel_is_exact_to_float_rounding_at_both_ends():
    bits = _edge_bits().to(KERNEL_DEVICE)
    out = torch.empty(bits.shape, dtype=torch.float32, device=KERNEL_DEVICE)
    _gumbel_of_bits_kernel[(triton.cdiv(bits.numel(), 1024),)](bits, out, bits.numel(), BLOCK=1024,
                                                               FAST_LOG=_fast_log(bits))  # fmt: skip
    err = (out.double().cpu() - _exact_gumbel(bits.cpu())).abs()
    assert err.max() < 1e-5, (bits[err.argmax()].item(), err.max().item())


# ------------------------------------------------------------------------------------------------ the argmax


@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_kernel_matches_reference(num_splits):
    """Mixed temperatures, a greedy row, a top-k-like masked row; chunk edges inside the vocabulary (V % 256 != 0)."""
    args = _problem(6, 3001, seed=1, device=KERNEL_DEVICE, greedy_rows=[2], masked_rows=[4])
    tokens = gumbel_argmax_triton(*args, block=256, num_splits=num_splits)
    assert tokens.dtype == torch.int64 and tokens.shape == (6,)
    _assert_same_tokens(tokens, args, min_checked=6)


def test_noise_decides_flat_rows():
    """Equal logits: the winner is the argmax of the noise alone, so a wrong hash or Gumbel shows up here."""
    keys = torch.tensor(EDGE_KEYS, dtype=torch.int64, device=KERNEL_DEVICE)
    steps = torch.tensor(EDGE_STEPS, dtype=torch.int64, device=KERNEL_DEVICE)
    logits = torch.zeros(len(EDGE_KEYS), 2000, device=KERNEL_DEVICE)
    temperature = torch.full((len(EDGE_KEYS),), 0.7, device=KERNEL_DEVICE)
    tokens = gumbel_argmax_triton(logits, temperature, keys, steps, block=512)
    assert torch.equal(tokens.cpu(), gumbel_noise_ref(keys, steps, 2000).argmax(-1).cpu())


def test_greedy_ties_go_to_the_lowest_token_across_chunks():
    logits = torch.zeros(3, 2000, device=KERNEL_DEVICE)
    logits[0, [1500, 700, 1999]] = 5.0  # tie in three different chunks of 256
    logits[1] = float("-inf")  # nothing allowed: torch.argmax answers 0
    logits[2, [3, 4]] = 1.0  # tie inside one lane group
    temperature = torch.zeros(3, device=KERNEL_DEVICE)
    zeros = torch.zeros(3, dtype=torch.int64, device=KERNEL_DEVICE)
    for splits in (1, 8):
        tokens = gumbel_argmax_triton(logits, temperature, zeros, zeros, block=256, num_splits=splits)
        assert tokens.tolist() == [700, 0, 3] == logits.argmax(-1).tolist()


def test_kernel_reads_half_precision_logits():
    logits, temperature, keys, steps = _problem(4, 1000, seed=2, device=KERNEL_DEVICE, greedy_rows=[0])
    half = logits.half()
    tokens = gumbel_argmax_triton(half, temperature, keys, steps, block=256)
    _assert_same_tokens(tokens, (half.float(), temperature, keys, steps), min_checked=4)


def test_strided_rows():
    """The runner passes a row slice of a larger logits tensor."""
    logits, temperature, keys, steps = _problem(5, 1500, seed=3, device=KERNEL_DEVICE)
    wide = torch.full((5, 1600), 100.0, device=KERNEL_DEVICE)  # poison outside the view
    wide[:, :1500] = logits
    tokens = gumbel_argmax_triton(wide[:, :1500], temperature, keys, steps, block=512)
    _assert_same_tokens(tokens, (logits, temperature, keys, steps), min_checked=5)


def test_dispatcher_runs_the_reference_on_cpu():
    args = _problem(3, 500, seed=4, device="cpu", greedy_rows=[1])
    assert torch.equal(gumbel_argmax(*args), gumbel_argmax_ref(*args))


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 7, 256])
def test_gpu_qwen3_vocab_matches_reference(n):
    args = _problem(n, QWEN3_VOCAB, seed=n, device="cuda", greedy_rows=[0] if n > 1 else [],
                    masked_rows=[n - 1] if n > 2 else [])  # fmt: skip
    tokens = gumbel_argmax(*args)
    torch.cuda.synchronize()
    _assert_same_tokens(tokens, args, min_checked=max(1, n - n // 50))


@pytest.mark.gpu
def test_gpu_noise_bits_at_full_vocab():
    keys = torch.tensor(EDGE_KEYS, dtype=torch.int64, device="cuda")
    steps = torch.tensor(EDGE_STEPS, dtype=torch.int64, device="cuda")
    bits, noise = gumbel_noise_triton(keys, steps, QWEN3_VOCAB)
    expected = noise_bits_ref(keys, steps, QWEN3_VOCAB)
    assert torch.equal(bits, expected)
    torch.testing.assert_close(noise, gumbel_from_bits_ref(expected), atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_gpu_kernel_follows_temperature():
    """4096 rows of the same 4 logits at T = 0.5: frequencies of softmax(logits / 0.5) (std ~0.008)."""
    n = 4096
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0], device="cuda").expand(n, 4).contiguous()
    keys = torch.arange(n, device="cuda") * 7919 + 11
    tokens = gumbel_argmax(logits, torch.full((n,), 0.5, device="cuda"), keys, torch.zeros_like(keys))
    freq = torch.bincount(tokens, minlength=4).float().cpu() / n
    assert torch.allclose(freq, (logits[0].cpu() / 0.5).softmax(-1), atol=0.03), freq


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 64])
def test_gpu_kernel_in_a_cuda_graph(n):
    """Captured once, replayed on new logits and keys: no host syncs, and the same tokens as eager calls."""
    logits, temperature, keys, steps = _problem(n, QWEN3_VOCAB, seed=5, device="cuda")
    static = [t.clone() for t in (logits, temperature, keys, steps)]
    gumbel_argmax(*static)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gumbel_argmax(*static)
    fresh = _problem(n, QWEN3_VOCAB, seed=6, device="cuda")
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, gumbel_argmax(*fresh))


# ------------------------------------------------------------------------------------------------ grammar bitmask


def _bitmask(n: int, vocab: int, seed: int, allowed_per_row: int) -> torch.Tensor:
    """xgrammar's layout: ``allowed_per_row`` random tokens allowed in each row (the last row: none)."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.zeros(n, -(-vocab // 32) + 1, dtype=torch.int64)  # one spare word: wider than the vocabulary
    for row in range(n - 1):
        for token in torch.randperm(vocab, generator=gen)[:allowed_per_row].tolist():
            words[row, token // 32] |= 1 << (token % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the bit pattern as int32


@pytest.mark.parametrize("num_splits", [1, 4])
def test_kernel_applies_a_grammar_bitmask_as_it_reads(num_splits):
    """Fused bitmask: the tokens of the reference on the masked logits, every sampled token allowed by its row's
    mask, a row with nothing allowed answering 0 as ``argmax`` of all -inf does; the logits are not written."""
    from kernels.token_bitmask import apply_token_bitmask_ref

    n, vocab = 6, 1001
    logits, temperature, keys, steps = _problem(n, vocab, seed=7, device=KERNEL_DEVICE, greedy_rows=[1])
    bitmask = _bitmask(n, vocab, seed=8, allowed_per_row=40).to(KERNEL_DEVICE)
    before = logits.clone()
    tokens = gumbel_argmax_triton(logits, temperature, keys, steps, block=256, num_splits=num_splits, bitmask=bitmask)
    assert torch.equal(logits, before)
    masked = apply_token_bitmask_ref(logits.clone(), torch.arange(n, device=KERNEL_DEVICE), bitmask)
    _assert_same_tokens(tokens[:-1], (masked[:-1], temperature[:-1], keys[:-1], steps[:-1]), min_checked=n - 1)
    assert tokens[-1].item() == 0
    words = bitmask.cpu().long()
    for row, token in enumerate(tokens[:-1].tolist()):
        assert (words[row, token // 32] >> (token % 32)) & 1, (row, token)
    assert torch.equal(gumbel_argmax_ref(logits, temperature, keys, steps, bitmask),
                       gumbel_argmax_ref(masked, temperature, keys, steps))


def test_kernel_bitmask_reads_half_precision_logits():
    from kernels.token_bitmask import apply_token_bitmask_ref

    logits, temperature, keys, steps = _problem(3, 700, seed=9, device=KERNEL_DEVICE)
    bitmask = _bitmask(4, 700, seed=10, allowed_per_row=25)[:3].to(KERNEL_DEVICE)
    half = logits.half()
    tokens = gumbel_argmax_triton(half, temperature, keys, steps, block=256, bitmask=bitmask)
    masked = apply_token_bitmask_ref(half.float(), torch.arange(3, device=KERNEL_DEVICE), bitmask)
    _assert_same_tokens(tokens, (masked, temperature, keys, steps), min_checked=3)


def test_a_bitmask_that_does_not_cover_the_logits_is_refused():
    logits, temperature, keys, steps = _problem(2, 100, seed=11, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="does not cover"):
        gumbel_argmax_triton(logits, temperature, keys, steps, bitmask=torch.zeros(2, 3, dtype=torch.int32,
                                                                                  device=KERNEL_DEVICE))


@pytest.mark.gpu
def test_gpu_fused_bitmask_at_full_vocab():
    from kernels.token_bitmask import apply_token_bitmask_ref

    n = 64
    logits, temperature, keys, steps = _problem(n, QWEN3_VOCAB, seed=12, device="cuda", greedy_rows=[0])
    bitmask = _bitmask(n, QWEN3_VOCAB, seed=13, allowed_per_row=500).cuda()
    tokens = gumbel_argmax(logits.bfloat16(), temperature, keys, steps, bitmask=bitmask)
    masked = apply_token_bitmask_ref(logits.bfloat16().float(), torch.arange(n, device="cuda"), bitmask)
    _assert_same_tokens(tokens[:-1], (masked[:-1], temperature[:-1], keys[:-1], steps[:-1]), min_checked=n - 2)
