"""Request sets: exact token lengths through the real tokenizer, ranges, shared prefixes, JSONL, seeds, arrivals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.datasets import custom_requests, exact_length_prompt, prefix_repetition_requests, random_requests
from benchmarks.serve import arrival_offsets


def test_random_prompts_reencode_to_exactly_the_requested_length(bench_tokenizer):
    requests = random_requests(bench_tokenizer, 40, input_len=97, output_len=13, seed=3)
    assert len(requests) == 40
    for r in requests:
        assert bench_tokenizer.encode(r.prompt) == r.prompt_token_ids
        assert r.prompt_len == 97 and r.expected_output_len == 13


def test_random_range_ratio_bounds_lengths(bench_tokenizer):
    requests = random_requests(bench_tokenizer, 200, input_len=40, output_len=20, range_ratio=0.5, seed=0)
    lens_in = [r.prompt_len for r in requests]
    lens_out = [r.expected_output_len for r in requests]
    assert min(lens_in) >= 20 and max(lens_in) <= 60 and len(set(lens_in)) > 10
    assert min(lens_out) >= 10 and max(lens_out) <= 30 and len(set(lens_out)) > 5
    assert all(bench_tokenizer.count(r.prompt) == r.prompt_len for r in requests)


def test_random_prefix_is_shared_in_token_space(bench_tokenizer):
    requests = random_requests(bench_tokenizer, 20, input_len=10, output_len=4, prefix_len=25, seed=0)
    assert {tuple(r.prompt_token_ids[:25]) for r in requests} == {tuple(requests[0].prompt_token_ids[:25])}
    assert all(bench_tokenizer.count(r.prompt) == 35 for r in requests)
    assert len({r.prompt for r in requests}) == 20


def test_same_seed_same_requests_other_seed_other_requests(bench_tokenizer):
    def prompts(seed):
        return [(r.prompt, r.expected_output_len) for r in
                random_requests(bench_tokenizer, 10, input_len=30, output_len=10, range_ratio=0.3, seed=seed)]

    assert prompts(7) == prompts(7)
    assert set(prompts(7)).isdisjoint(prompts(8))


def test_prefix_repetition_has_the_asked_prefixes_and_lengths(bench_tokenizer):
    requests = prefix_repetition_requests(bench_tokenizer, 30, prefix_len=40, suffix_len=12, num_prefixes=4,
                                          output_len=9, seed=0)
    assert len(requests) == 30
    prefixes = [tuple(r.prompt_token_ids[:40]) for r in requests]
    assert len(set(prefixes)) == 4
    assert sorted(prefixes.count(p) for p in set(prefixes)) == [7, 7, 8, 8]
    assert all(bench_tokenizer.count(r.prompt) == 52 and r.expected_output_len == 9 for r in requests)
    assert len({r.prompt for r in requests}) == 30
    with pytest.raises(ValueError):
        prefix_repetition_requests(bench_tokenizer, 3, 8, 8, num_prefixes=4, output_len=4)


def test_exact_length_survives_tokens_that_merge_on_reencode(bench_tokenizer):
    # many single-character tokens in a row re-encode into fewer merged tokens: the fix-up must still land exactly
    rng = np.random.default_rng(0)
    for target in (1, 2, 5, 64, 300):
        text, ids, exact = exact_length_prompt(bench_tokenizer, rng, target)
        assert exact and len(bench_tokenizer.encode(text)) == target and bench_tokenizer.encode(text) == ids


def test_custom_jsonl_prompts_and_conversations(bench_tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [
        {"prompt": "What is the capital of France?", "output_tokens": 7},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]},
        "Tell me a joke.",
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    chat = custom_requests(bench_tokenizer, path, 5, output_len=32, chat=True, shuffle=False)
    assert [r.expected_output_len for r in chat] == [7, 32, 32, 7, 32]  # cycled past the end of the file
    assert chat[0].messages == [{"role": "user", "content": "What is the capital of France?"}]
    assert chat[1].messages[0] == {"role": "system", "content": "Be brief."}
    completions = custom_requests(bench_tokenizer, path, 3, output_len=32, chat=False, shuffle=False)
    assert completions[0].messages is None
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in completions[0].prompt
    assert completions[0].prompt_len == bench_tokenizer.count(completions[0].prompt)
    raw = custom_requests(bench_tokenizer, path, 1, output_len=32, chat=False, apply_chat_template=False,
                          shuffle=False)
    assert raw[0].prompt == "What is the capital of France?"
    shuffled = [r.prompt for r in custom_requests(bench_tokenizer, path, 3, 32, chat=False, seed=1)]
    assert shuffled == [r.prompt for r in custom_requests(bench_tokenizer, path, 3, 32, chat=False, seed=1)]


def test_custom_jsonl_rejects_lines_without_a_prompt(bench_tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "no prompt key"}) + "\n")
    with pytest.raises(ValueError, match="prompt"):
        custom_requests(bench_tokenizer, path, 1, output_len=8, chat=False)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(5, float("inf"), 1.0, seed=0).tolist() == [0.0] * 5


def test_poisson_arrivals_have_the_asked_rate_and_are_seeded():
    offsets = arrival_offsets(4000, request_rate=50.0, burstiness=1.0, seed=0)
    gaps = np.diff(offsets)
    assert offsets[-1] == pytest.approx(4000 / 50.0)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.06)  # exponential gaps: coefficient of variation 1
    assert np.array_equal(offsets, arrival_offsets(4000, 50.0, 1.0, seed=0))
    assert not np.array_equal(offsets, arrival_offsets(4000, 50.0, 1.0, seed=1))


def test_burstiness_sets_the_spread_of_gaps():
    bursty = np.diff(arrival_offsets(4000, 50.0, burstiness=0.25, seed=0))
    regular = np.diff(arrival_offsets(4000, 50.0, burstiness=16.0, seed=0))
    # gamma(shape k) gaps have coefficient of variation 1/sqrt(k)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)
    assert regular.std() / regular.mean() == pytest.approx(0.25, rel=0.1)
    assert np.allclose(np.diff(arrival_offsets(10, 5.0, float("inf"), seed=0)), 0.2)
