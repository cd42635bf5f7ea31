"""Prefix caching end to end: same outputs with the cache on and off, fewer blocks, honest hit counts."""

from __future__ import annotations

import random

import pytest
import torch

from ipc.messages import EngineRequest, SamplingParams
from tests.core.engine_utils import make_engine, run_engine
from tests.tiny_models import VOCAB, make_tiny_model

BS = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("prefix"), "qwen3", 0)


def shared_prefix_prompts(num: int, prefix_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(2, VOCAB) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(2, VOCAB) for _ in range(5 + 3 * i)] for i in range(num)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
SETTINGS = {
    "plain": {},
    "preemption": dict(num_gpu_blocks_override=8, max_model_len=96),
    "chunked": dict(max_num_batched_tokens=20),
    "async": dict(async_scheduling=True, num_gpu_blocks_override=8, max_model_len=96),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_outputs_identical_with_caching_on_and_off(model, setting):
    prompts = shared_prefix_prompts(6, 40)
    results = {}
    for caching in (False, True):
        engine = make_engine(model, enable_prefix_caching=caching, **SETTINGS[setting])
        # two waves: the second wave finds the first wave's blocks in the cache
        results[caching] = run_engine(engine, prompts[:3], GREEDY) | {
            (k[0] + 3, k[1]): v for k, v in run_engine(engine, prompts[3:], GREEDY).items()}
        if caching:
            assert engine.get_stats()["prefix_cache_hits"] > 0
        if setting in ("preemption", "async"):
            assert engine.scheduler.total_preemptions > 0, caching
    for key, off in results[False].items():
        on = results[True][key]
        assert on["tokens"] == off["tokens"], key
        for a, b in zip(on["logprobs"], off["logprobs"]):
            assert a.keys() == b.keys()
            assert torch.allclose(torch.tensor(list(a.values())), torch.tensor(list(b.values())), atol=1e-5)


def test_n_sequences_identical_with_caching_on_and_off(model):
    prompt = shared_prefix_prompts(1, 37)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    on = run_engine(make_engine(model, enable_prefix_caching=True), [prompt], params)
    off = run_engine(make_engine(model, enable_prefix_caching=False), [prompt], params)
    assert {k: v["tokens"] for k, v in on.items()} == {k: v["tokens"] for k, v in off.items()}


def test_shared_ten_block_prefix_allocates_ten_fewer_blocks(model):
    prefix = [7 + (i % 200) for i in range(10 * BS)]
    prompts = [prefix + [300, 301, 302], prefix + [310, 311]]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    allocated = {}
    for caching in (False, True):
        engine = make_engine(model, enable_prefix_caching=caching)
        run_engine(engine, prompts, params)
        allocated[caching] = engine.kv.pool.num_allocated
    assert allocated[False] - allocated[True] == 10


def test_hits_are_counted_in_tokens_and_reported(model):
    engine = make_engine(model)
    prompts = shared_prefix_prompts(2, 3 * BS)  # 48 shared tokens = 3 full blocks
    run_engine(engine, prompts[:1], GREEDY)
    before = engine.get_stats()
    outputs = run_engine(engine, prompts[1:], GREEDY)
    after = engine.get_stats()
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == len(prompts[1])
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 3 * BS


def test_num_cached_tokens_reaches_the_output(model):
    engine = make_engine(model)
    prompts = shared_prefix_prompts(2, 2 * BS)
    run_engine(engine, prompts[:1], GREEDY)
    engine.add_request(EngineRequest("x", prompts[1], GREEDY))
    first = None
    while engine.has_work():
        for out in engine.step().outputs:
            if first is None and out.new_token_ids:
                first = out
    assert first.num_cached_tokens == 2 * BS


def test_cache_salt_keeps_tenants_apart(model):
    engine = make_engine(model)
    prompt = shared_prefix_prompts(1, 3 * BS)[0]
    for salt in ("a", "b"):
        engine.add_request(EngineRequest(salt, prompt, GREEDY, cache_salt=salt))
        while engine.has_work():
            engine.step()
    assert engine.get_stats()["prefix_cache_hits"] == 0
    engine.add_request(EngineRequest("a2", prompt, GREEDY, cache_salt="a"))
    while engine.has_work():
        engine.step()
    assert engine.get_stats()["prefix_cache_hits"] == 3 * BS


def test_reset_prefix_cache_forgets_everything(model):
    engine = make_engine(model)
    prompts = shared_prefix_prompts(2, 2 * BS)
    run_engine(engine, prompts[:1], GREEDY)
    assert engine.reset_prefix_cache()
    run_engine(engine, prompts[1:], GREEDY)
    assert engine.get_stats()["prefix_cache_hits"] == 0
