"""Sampler unit tests: masks against direct computations, penalties against a hand-computed example, hash noise
(seeded reproducibility, the sampled distribution, temperature), and build_sampling_batch's keys and bans."""

from __future__ import annotations

import pytest
import torch

from core.sequence import Sequence
from core.sampler import (
    Penalties,
    Sampler,
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    gather_logprobs,
)
from core.sampling_metadata import build_sampling_batch, unseeded_row_keys
from ipc.messages import SamplingParams
from kernels.sampling import gumbel_argmax_ref

CPU = torch.device("cpu")


def batch(temps, keys=None, steps=None, **kw) -> SamplingBatch:
    t = torch.tensor(temps, dtype=torch.float32)
    n = len(temps)
    keys = torch.arange(n, dtype=torch.int64) * 7919 + 1 if keys is None else torch.as_tensor(keys)
    steps = torch.zeros(n, dtype=torch.int64) if steps is None else torch.as_tensor(steps)
    return SamplingBatch(t, all_greedy=bool((t == 0).all()), keys=keys, steps=steps, **kw)


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).float() / tokens.numel()


def sequence(params: SamplingParams, rid: str = "r", eos: frozenset[int] = frozenset()) -> Sequence:
    return Sequence(rid, [1, 2, 3], params, eos_token_ids=eos, max_model_len=64)


def test_top_k_keeps_exactly_the_k_largest_per_row():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    k = torch.tensor([1, 5, 0, 50])
    out = apply_top_k_top_p(logits, k, None)
    for row, kk in enumerate([1, 5, 50, 50]):
        kept = set(torch.nonzero(out[row] > float("-inf")).flatten().tolist())
        assert kept == set(logits[row].topk(kk).indices.tolist())
        assert torch.equal(out[row][list(kept)], logits[row][list(kept)])


def test_top_p_keeps_the_smallest_set_reaching_p():
    torch.manual_seed(1)
    logits = torch.randn(3, 40) * 2
    p = torch.tensor([0.3, 0.9, 1.0])
    out = apply_top_k_top_p(logits, None, p)
    for row in range(3):
        probs = logits[row].softmax(-1)
        order = probs.argsort(descending=True)
        # direct: walk down from the most likely token until the mass before it reaches p
        kept, mass = set(), 0.0
        for tok in order.tolist():
            if mass >= p[row].item() - 1e-7:
                break
            kept.add(tok)
            mass += probs[tok].item()
        assert set(torch.nonzero(out[row] > float("-inf")).flatten().tolist()) == kept


def test_top_k_then_top_p_renormalizes_over_the_top_k():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    out = apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([0.5]))
    # over the top-2 {0.4, 0.3} -> {0.571, 0.429}: 0.571 alone is >= 0.5
    assert (out[0] > float("-inf")).tolist() == [True, False, False, False]


def test_min_p_drops_tokens_below_fraction_of_the_top_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = apply_min_p(logits, torch.tensor([0.2]))  # threshold 0.1
    assert (out[0] > float("-inf")).tolist() == [True, True, True, False]


def test_penalties_match_a_hand_computed_example():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0]])  # output: token 1 twice, token 2 once
    seen = torch.tensor([[True, True, True, False]])  # prompt had token 0
    p = Penalties(presence=torch.tensor([[0.5]]), frequency=torch.tensor([[0.25]]),
                  repetition=torch.tensor([[2.0]]), output_counts=counts, seen_mask=seen)
    out = apply_penalties(logits, p)
    # token 0: seen, positive -> 2/2 = 1; no output count
    # token 1: seen, negative -> -1*2 = -2; minus 0.25*2 + 0.5 = -3
    # token 2: seen, positive -> 0.25; minus 0.25*1 + 0.5 = -0.5
    # token 3: untouched
    assert torch.allclose(out, torch.tensor([[1.0, -3.0, -0.5, 3.0]]))


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(1, 100)
    alone = Sampler()(logits.clone(), batch([1.0], keys=[12345], steps=[3]))
    crowd_logits = torch.cat([torch.randn(2, 100), logits, torch.randn(3, 100)])
    crowd = Sampler()(crowd_logits, batch([0.7, 0.0, 1.0, 1.3, 1.0, 0.5], keys=[1, 2, 12345, 4, 5, 6],
                                          steps=[0, 0, 3, 9, 0, 1]))
    assert crowd.token_ids[2] == alone.token_ids[0]


def test_hash_sampling_follows_the_distribution():
    """Over many (key, step) draws the Gumbel-max pass samples tokens with their probabilities."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 20000
    tokens = gumbel_argmax_ref(probs.log().expand(n, 4), torch.ones(n), torch.arange(n) * 7919 % 2**32,
                               torch.arange(n) % 13)
    assert torch.allclose(frequencies(tokens, 4), probs, atol=0.015), frequencies(tokens, 4)


def test_temperature_reshapes_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 20000
    for temperature in (0.5, 2.0):
        out = Sampler()(logits.expand(n, 4).clone(), batch([temperature] * n))
        expected = (logits / temperature).softmax(-1)
        assert torch.allclose(frequencies(out.token_ids, 4), expected, atol=0.015), (temperature, expected)


def test_top_k_samples_the_tempered_survivors():
    """top_k=2 at T=2: only the top two tokens, in proportion softmax([2, 1] / 2); a greedy row beside it."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(10000, 4).clone()
    temps = [2.0] * 9999 + [0.0]
    out = Sampler()(logits, batch(temps, top_k=torch.tensor([2] * 9999 + [0])))
    freq = frequencies(out.token_ids[:-1], 4)
    expected = torch.tensor([1.0, 0.5]).softmax(-1)
    assert freq[2:].sum() == 0 and torch.allclose(freq[:2], expected, atol=0.02), freq
    assert out.token_ids[-1] == 0


def test_unseeded_rows_repeat_with_the_step_key_and_change_without_it():
    logits = torch.zeros(64, 1000)  # flat: the noise alone decides
    def draw(step_key: int) -> torch.Tensor:
        keys = torch.from_numpy(unseeded_row_keys(step_key, 64))
        return Sampler()(logits.clone(), batch([1.0] * 64, keys=keys)).token_ids

    assert torch.equal(draw(7), draw(7))
    assert (draw(7) != draw(8)).sum() > 50
    assert len(set(draw(7).tolist())) > 50  # rows of one step do not share noise


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    torch.manual_seed(2)
    logits = torch.randn(4, 30)
    out = Sampler()(logits.clone(), batch([0.0, 1.0, 0.0, 2.0]))
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()


@pytest.mark.gpu
def test_all_greedy_batch_on_cuda_takes_torchs_argmax_ties_included():
    """An all-greedy batch on CUDA runs the sampling kernel's split argmax instead of ``torch.argmax``: the same
    token, the lowest id among equal maxima, at a Llama-3 vocabulary and with few rows."""
    torch.manual_seed(3)
    for rows in (1, 3):
        logits = torch.randn(rows, 128256, device="cuda")
        logits[:, 5000] = logits[:, 90000] = logits.max() + 1.0  # a tie across two vocabulary chunks
        if rows > 1:
            logits[-1, :] = float("-inf")  # every token masked: torch answers 0
        greedy = batch([0.0] * rows)
        greedy = SamplingBatch(greedy.temperature.cuda(), all_greedy=True, keys=greedy.keys.cuda(),
                               steps=greedy.steps.cuda())
        assert torch.equal(Sampler()(logits.clone(), greedy).token_ids, logits.argmax(-1))


def test_logit_bias_and_banned_tokens():
    logits = torch.zeros(2, 10)
    b = batch([0.0, 0.0], logit_bias=(torch.tensor([0]), torch.tensor([7]), torch.tensor([5.0])),
              banned=(torch.tensor([1]), torch.tensor([0])))
    logits[1, 0] = 10.0
    out = Sampler()(logits, b)
    assert out.token_ids.tolist()[0] == 7 and out.token_ids.tolist()[1] != 0


def test_build_sampling_batch_noise_keys():
    seeded = SamplingParams(temperature=1.0, seed=42)
    reqs = [sequence(SamplingParams(temperature=1.0), "a"), sequence(seeded, "b"), sequence(SamplingParams(), "c")]
    b = build_sampling_batch(reqs, 100, CPU, output_indices=[4, 7, 0], step_key=99)
    expected = unseeded_row_keys(99, 3)
    assert b.keys.tolist() == [expected[0], reqs[1].seed_key, expected[2]]
    assert b.steps.tolist() == [0, 7, 0]
    assert build_sampling_batch(reqs, 100, CPU, [4, 7, 0], 100).keys[0] != b.keys[0]


def test_build_sampling_batch_bans_eos_by_output_index():
    """min_tokens counts the index of the token being sampled (async scheduling: num_output_tokens may lag)."""
    r = sequence(SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5]), eos=frozenset({9}))
    assert r.num_output_tokens == 0
    banned = build_sampling_batch([r], 100, CPU, output_indices=[2], step_key=0).banned
    assert banned is not None and banned[0].tolist() == [0, 0] and sorted(banned[1].tolist()) == [5, 9]
    assert build_sampling_batch([r], 100, CPU, output_indices=[3], step_key=0).banned is None


def test_build_sampling_batch_gives_greedy_rows_no_filters():
    greedy = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2)
    b = build_sampling_batch([sequence(greedy, "g")], 100, CPU, [0], 1)
    assert b.all_greedy and b.top_k is None and b.top_p is None and b.min_p is None
    mixed = build_sampling_batch([sequence(greedy, "g"), sequence(SamplingParams(top_k=3), "s")], 100, CPU, [0, 0], 1)
    assert mixed.top_k.tolist() == [0, 3] and mixed.top_p is None


def test_logprobs_rank_and_top_k():
    lp = torch.tensor([[0.1, 0.5, 0.2, 0.2]]).log()
    ids, values, ranks = gather_logprobs(lp, torch.tensor([2]), 2)
    assert ids.tolist() == [[2, 1, 2]] or ids.tolist() == [[2, 1, 3]]
    assert ranks.tolist() == [2]
    assert torch.allclose(values[0, 0], lp[0, 2])


def test_allowed_token_ids_restrict_only_their_rows():
    """Greedy and random rows restricted to their allowed ids sample nothing else; an unrestricted row is free."""
    torch.manual_seed(3)
    logits = torch.randn(3, 50)
    rows = [sequence(SamplingParams(temperature=0.0, allowed_token_ids=[4, 9]), "a"),
            sequence(SamplingParams(temperature=5.0, allowed_token_ids=[11, 12, 13]), "b"),
            sequence(SamplingParams(temperature=0.0), "c")]
    for step in range(20):
        b = build_sampling_batch(rows, 50, CPU, [0, 0, 0], step_key=step)
        out = Sampler()(logits.clone(), b).token_ids.tolist()
        assert out[0] == max((4, 9), key=lambda t: logits[0, t]) and out[1] in (11, 12, 13)
        assert out[2] == logits[2].argmax()
    assert build_sampling_batch(rows[2:], 50, CPU, [0], 0).allowed is None  # unused: no mask built


def test_bad_words_ban_single_tokens_always_and_a_longer_word_after_its_prefix():
    params = SamplingParams(temperature=0.0, bad_words_token_ids=[[7], [3, 8]])
    seq = sequence(params)
    b = build_sampling_batch([seq], 20, CPU, [0], 0)
    assert sorted(b.banned[1].tolist()) == [7]  # 8 is allowed: the output does not end with 3
    seq.append_token(3)
    b = build_sampling_batch([seq], 20, CPU, [1], 0)
    assert sorted(b.banned[1].tolist()) == [7, 8]
    logits = torch.zeros(1, 20)
    logits[0, 8], logits[0, 7], logits[0, 2] = 9.0, 8.0, 1.0
    assert Sampler()(logits, b).token_ids.tolist() == [2]


def test_requested_logprob_token_ids_are_gathered_in_one_batch():
    """Rows with logprob_token_ids get those ids' logprobs (in the order asked); others keep their top-N."""
    torch.manual_seed(5)
    logits = torch.randn(3, 30)
    rows = [sequence(SamplingParams(temperature=0.0, logprobs=1, logprob_token_ids=[5, 2, 29]), "a"),
            sequence(SamplingParams(temperature=0.0, logprobs=2), "b"),
            sequence(SamplingParams(temperature=0.0, logprobs=1, logprob_token_ids=[0]), "c")]
    b = build_sampling_batch(rows, 30, CPU, [0, 0, 0], 0)
    assert b.max_num_logprobs == 2 and b.requested_token_ids.tolist() == [[5, 2, 29], [0, 0, 0], [0, 0, 0]]
    out = Sampler()(logits.clone(), b)
    lp = logits.log_softmax(-1)
    assert torch.allclose(out.requested_logprobs[0], lp[0, [5, 2, 29]])
    assert torch.allclose(out.requested_logprobs[2, 0], lp[2, 0])
    assert out.logprobs.shape == (3, 3) and torch.allclose(out.logprobs[:, 0], lp.gather(-1, out.token_ids[:, None])[:, 0])
    none = build_sampling_batch(rows[1:2], 30, CPU, [0], 0)
    assert none.requested_token_ids is None


def _grammar_bitmask(allowed: list[list[int]], vocab: int) -> torch.Tensor:
    words = torch.zeros(len(allowed), -(-vocab // 32), dtype=torch.int64)
    for row, tokens in enumerate(allowed):
        for token in tokens:
            words[row, token // 32] |= 1 << (token % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_a_grammar_on_every_row_is_applied_inside_the_sampling_pass(monkeypatch):
    """Every row constrained and nothing else to apply: one fused pass (no separate bitmask op), the same tokens as
    the bitmask applied first; with a logit bias too, the separate op runs (and the bias cannot revive a token)."""
    import core.sampler as sampler_module

    torch.manual_seed(3)
    vocab = 70
    logits = torch.randn(3, vocab) * 4
    allowed = [[1, 5, 40, 69], [2, 3], [64, 65, 66]]
    rows, bitmask = torch.arange(3), _grammar_bitmask(allowed, vocab)
    temps = [0.8, 1.5, 0.0]
    steps = torch.arange(3, dtype=torch.int64) * 11
    separate = []
    from core.structured_output.bitmask import apply_token_bitmask

    def counting(*args, **kw):
        separate.append(1)
        return apply_token_bitmask(*args, **kw)

    monkeypatch.setattr(sampler_module, "apply_token_bitmask", counting)
    masked = logits.clone()
    apply_token_bitmask(masked, rows, bitmask)
    for step in range(20):  # many noise draws: each must stay inside its row's grammar
        fused = Sampler()(logits.clone(), batch(temps, steps=steps + step, grammar=(rows, bitmask)))
        assert fused.token_ids.tolist() == gumbel_argmax_ref(masked, torch.tensor(temps), batch(temps).keys,
                                                             steps + step).tolist()
        assert all(token in allowed[i] for i, token in enumerate(fused.token_ids.tolist()))
    assert not separate
    bias = (torch.tensor([0]), torch.tensor([7]), torch.tensor([100.0]))
    biased = Sampler()(logits.clone(), batch(temps, steps=steps, grammar=(rows, bitmask), logit_bias=bias))
    assert separate and biased.token_ids[0].item() in allowed[0]
    separate.clear()
    some_rows = Sampler()(logits[:2].clone(), batch(temps[:2], grammar=(rows[:1], bitmask[:1])))
    assert separate and some_rows.token_ids[0].item() in allowed[0]
