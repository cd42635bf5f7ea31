"""Greedy outputs of the engine match transformers' generate on tiny random models of every supported family."""

from __future__ import annotations

import random

import pytest

from ipc.messages import SamplingParams
from tests.core.engine_utils import make_engine, run_engine
from tests.tiny_models import VOCAB, hf_greedy, make_tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
MAX_TOKENS = 12


def random_prompts(seed: int, lengths=(1, 5, 16, 17, 40, 70)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(n)] for n in lengths]


def assert_logprobs_close(ours: dict[int, float], theirs: dict[int, float], where: str) -> None:
    """vLLM's check_logprobs_close rule on identical tokens: the top tokens agree and their logprobs are close."""
    shared = set(ours) & set(theirs)
    assert len(shared) == 5, f"{where}: top-5 sets differ: {sorted(ours)} vs {sorted(theirs)}"
    for token in shared:
        assert ours[token] == pytest.approx(theirs[token], abs=2e-3), f"{where}: token {token}"


def check_against_hf(model_path, results, prompts, reference) -> None:
    for i, prompt in enumerate(prompts):
        hf_tokens, hf_logprobs = reference[i]
        got = results[(i, 0)]
        assert got["tokens"] == hf_tokens, f"prompt {i} (len {len(prompt)})"
        for step, (ours, theirs) in enumerate(zip(got["logprobs"], hf_logprobs)):
            # one dict of the sampled token and the top 5: greedy's pick is the top 1, so it is exactly the top 5
            assert len(ours) == 5
            assert_logprobs_close(ours, theirs, f"prompt {i} step {step}")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_matches_hf(models_dir, arch, seed):
    path = make_tiny_model(models_dir, arch, seed)
    prompts = random_prompts(seed)
    engine = make_engine(path)
    results = run_engine(engine, prompts, GREEDY)
    check_against_hf(path, results, prompts, hf_greedy(path, prompts, MAX_TOKENS))
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1


STRESS = {
    "preemption": dict(num_gpu_blocks_override=8, max_model_len=96),
    "chunked_prefill": dict(max_num_batched_tokens=8),
    "one_seq_at_a_time": dict(max_num_seqs=1),
    "async_scheduling": dict(async_scheduling=True),
    "async_preemption": dict(num_gpu_blocks_override=8, max_model_len=96, async_scheduling=True),
    "async_chunked": dict(max_num_batched_tokens=8, async_scheduling=True),
}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("stress", sorted(STRESS))
def test_greedy_matches_hf_under_stress(models_dir, arch, stress):
    path = make_tiny_model(models_dir, arch, 0)
    # Prompts just under a block boundary: they all fit at admission and all need a second block while decoding.
    prompts = random_prompts(3, lengths=(14, 13, 15, 14, 12, 30))
    engine = make_engine(path, **STRESS[stress])
    results = run_engine(engine, prompts, GREEDY)
    check_against_hf(path, results, prompts, hf_greedy(path, prompts, MAX_TOKENS))
    if "preemption" in stress:
        assert engine.scheduler.total_preemptions > 0
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1
