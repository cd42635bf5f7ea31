"""Sampler unit tests: masks against direct computations, penalties against a hand-computed example, seeded noise."""

from __future__ import annotations

import torch

from core.sampler import (
    Penalties,
    Sampler,
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    gather_logprobs,
    seeded_exponential,
)


def batch(temps, **kw) -> SamplingBatch:
    t = torch.tensor(temps, dtype=torch.float32)
    return SamplingBatch(t, all_greedy=bool((t == 0).all()), any_greedy=bool((t == 0).any()), **kw)


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
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    key, step = torch.tensor([12345]), torch.tensor([3])
    alone = sampler(logits.clone(), batch([1.0], seeded_rows=torch.tensor([0]), seed_keys=key, seed_steps=step))
    crowd_logits = torch.cat([torch.randn(2, 100), logits, torch.randn(3, 100)])
    crowd = sampler(crowd_logits, batch([0.7, 0.0, 1.0, 1.3, 1.0, 0.5], seeded_rows=torch.tensor([2]),
                                        seed_keys=key, seed_steps=step))
    assert crowd.token_ids[2] == alone.token_ids[0]


def test_seeded_noise_changes_with_step_and_seed():
    a = seeded_exponential(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 64)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert torch.equal(a, seeded_exponential(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 64))


def test_seeded_sampling_follows_the_distribution():
    """Over many (seed, step) draws the hash noise samples tokens with their probabilities."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 20000
    noise = seeded_exponential(torch.arange(n) * 7919 % 2**32, torch.arange(n) % 13, 4)
    freq = torch.bincount((probs[None] / noise).argmax(-1), minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015), freq


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    torch.manual_seed(2)
    logits = torch.randn(4, 30)
    out = Sampler(0, torch.device("cpu"))(logits.clone(), batch([0.0, 1.0, 0.0, 2.0]))
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()


def test_logit_bias_and_banned_tokens():
    logits = torch.zeros(2, 10)
    b = batch([0.0, 0.0], logit_bias=(torch.tensor([0]), torch.tensor([7]), torch.tensor([5.0])),
              banned=(torch.tensor([1]), torch.tensor([0])))
    logits[1, 0] = 10.0
    out = Sampler(0, torch.device("cpu"))(logits, b)
    assert out.token_ids.tolist()[0] == 7 and out.token_ids.tolist()[1] != 0


def test_logprobs_rank_and_top_k():
    lp = torch.tensor([[0.1, 0.5, 0.2, 0.2]]).log()
    ids, values, ranks = gather_logprobs(lp, torch.tensor([2]), 2)
    assert ids.tolist() == [[2, 1, 2]] or ids.tolist() == [[2, 1, 3]]
    assert ranks.tolist() == [2]
    assert torch.allclose(values[0, 0], lp[0, 2])
