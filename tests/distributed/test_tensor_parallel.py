"""Tensor and pipeline parallelism on CPU (gloo, a worker process per extra rank): greedy tokens with tp=2, pp=2 and
tp=2 x pp=2 equal one device's in fp32, for Llama and Qwen3, with GQA, one KV head replicated over the ranks, and a
vocabulary that does not split evenly; impossible layouts fail at startup naming the reason."""

from __future__ import annotations

import pytest
import torch

from ipc.messages import SamplingParams
from tests.core.engine_utils import make_engine, run_engine
from tests.tiny_models import hf_config

PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [100, 3, 250, 8], list(range(20, 58)), [7] * 3]


def save_model(directory, arch: str, **overrides):
    import transformers

    name = arch + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    path = directory / name
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, **overrides), dtype=torch.float32)
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tp-models")


_REFERENCES: dict = {}


def reference_tokens(path):
    """One device's greedy run, computed once per model for the module."""
    if path not in _REFERENCES:
        _REFERENCES[path] = greedy_tokens(path)
    return _REFERENCES[path]


def greedy_tokens(path, **kwargs):
    engine = make_engine(path, dtype="float32", max_num_seqs=4, max_num_batched_tokens=64, **kwargs)
    tp, pp = kwargs.get("tensor_parallel_size", 1), kwargs.get("pipeline_parallel_size", 1)
    cfg = engine.runner.model_config
    assert engine.runner.shard_config.num_heads == cfg.num_heads // tp  # this rank holds its share only
    assert engine.runner.kv_caches[0].shape[3] == max(1, cfg.num_kv_heads // tp)
    assert len(engine.runner.kv_caches) == cfg.num_layers // pp  # and its stage's layers only
    assert (engine.executor is None) == (tp * pp == 1)
    assert tp * pp == 1 or len(engine.executor.worker_pids) == tp * pp - 1
    try:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
        results = run_engine(engine, PROMPTS, params)
    finally:
        engine.shutdown()
    return {k: v["tokens"] for k, v in results.items()}, {k: v["logprobs"] for k, v in results.items()}


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),  # 4 heads, 2 KV heads: one KV head per rank; untied LM head
    ("qwen3", {"num_key_value_heads": 1, "vocab_size": 383}),  # one KV head on both ranks; tied, odd vocabulary
    ("llama", {"num_key_value_heads": 1, "vocab_size": 383}),
], ids=["llama-gqa", "qwen3-kv1-vocab383", "llama-kv1-vocab383"])
def test_tp2_greedy_equals_tp1(models_dir, arch, overrides):
    path = save_model(models_dir, arch, **overrides)
    reference, ref_logprobs = reference_tokens(path)
    tokens, logprobs = greedy_tokens(path, tensor_parallel_size=2)
    assert tokens == reference
    for key in reference:  # and the numbers behind them
        for want, got in zip(ref_logprobs[key], logprobs[key]):
            assert want.keys() == got.keys()
            assert all(abs(want[t] - got[t]) < 1e-4 for t in want)


def test_pp2_greedy_equals_pp1(models_dir):
    path = save_model(models_dir, "llama")
    reference, _ = reference_tokens(path)
    tokens, _ = greedy_tokens(path, pipeline_parallel_size=2)
    assert tokens == reference


def test_tp2_x_pp2_greedy_equals_single_device(models_dir):
    path = save_model(models_dir, "qwen3", num_key_value_heads=1, vocab_size=383)
    reference, _ = reference_tokens(path)
    tokens, _ = greedy_tokens(path, tensor_parallel_size=2, pipeline_parallel_size=2)
    assert tokens == reference


def test_impossible_layouts_fail_at_startup(models_dir):
    path = save_model(models_dir, "llama")
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible"):
        make_engine(path, tensor_parallel_size=3)
    gpt2 = save_model(models_dir, "gpt2")
    with pytest.raises(ValueError, match="GPT2LMHeadModel cannot be split across devices"):
        make_engine(gpt2, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 is more stages than the model's 2 layers"):
        make_engine(path, pipeline_parallel_size=3)


@pytest.mark.parametrize("features", [
    # async scheduling (in-flight tokens reach the other rank by broadcast), chunked prefill, preemption, prefix hits
    {"async_scheduling": True, "num_gpu_blocks_override": 14, "block_size": 4, "max_num_batched_tokens": 16,
     "max_model_len": 48},
    {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}},
], ids=["async-chunked-preempt", "ngram-spec"])
def test_tp2_keeps_the_engine_features(models_dir, features):
    path = save_model(models_dir, "llama")
    prompts = [[5, 6, 7, 8] * 4, [5, 6, 7, 8] * 4 + [9, 10], list(range(20, 45)), [7, 8] * 5]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    results = []
    for tp in (1, 2):
        engine = make_engine(path, dtype="float32", max_num_seqs=4, tensor_parallel_size=tp, **features)
        try:
            out = run_engine(engine, prompts, params)
            stats = engine.get_stats()
        finally:
            engine.shutdown()
        results.append({k: v["tokens"] for k, v in out.items()})
        if "num_gpu_blocks_override" in features:
            assert stats["total_preemptions"] > 0 and stats["prefix_cache_hits"] > 0, stats
    assert results[1] == results[0]


def test_tp2_through_ray_equals_tp1(models_dir):
    """The same worker code as Ray actors (a local Ray instance, CPU bundles): the same greedy tokens."""
    ray = pytest.importorskip("ray")
    path = save_model(models_dir, "qwen3", num_key_value_heads=1, vocab_size=383)
    reference, _ = reference_tokens(path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tokens, _ = greedy_tokens(path, tensor_parallel_size=2, distributed_executor_backend="ray")
    finally:
        ray.shutdown()
    assert tokens == reference
