"""HF parity for the families of issue 11 on tiny random models: greedy ids identical to transformers' generate, top-5
logprobs close; prompts longer than the sliding window, mixed lengths in one batch; chunked prefill and preemption
for the sliding-window and soft-capped families."""

from __future__ import annotations

import pytest

from core.config import ModelConfig
from tests.core.engine_utils import make_engine, run_engine
from tests.core.test_model_parity import GREEDY, MAX_TOKENS, check_against_hf, random_prompts
from tests.tiny_models import SLIDING_WINDOW, hf_config, hf_greedy, make_tiny_model

FAMILIES = ["mistral_sw", "qwen2_sw", "gemma", "gemma2", "gemma3", "starcoder2", "gpt_neox", "gpt2", "phi3",
            "falcon", "falcon_mq", "falcon_seq", "falcon_alibi"]
# Mixed lengths in one batch: shorter than, equal to and far past the window.
LENGTHS = (1, 5, SLIDING_WINDOW, 17, 40, 70)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-families")


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_greedy_matches_hf(models_dir, arch):
    path = make_tiny_model(models_dir, arch, 0)
    prompts = random_prompts(11, lengths=LENGTHS)
    engine = make_engine(path)
    results = run_engine(engine, prompts, GREEDY)
    check_against_hf(path, results, prompts, hf_greedy(path, prompts, MAX_TOKENS))
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1


STRESS = {
    "preemption": dict(num_gpu_blocks_override=10, max_model_len=96),
    "chunked_prefill": dict(max_num_batched_tokens=8),
}


@pytest.mark.parametrize("arch", ["mistral_sw", "gemma2"])
@pytest.mark.parametrize("stress", sorted(STRESS))
def test_family_greedy_matches_hf_under_stress(models_dir, arch, stress):
    path = make_tiny_model(models_dir, arch, 0)
    prompts = random_prompts(5, lengths=(14, 13, 30, 14, 12, 25))
    engine = make_engine(path, **STRESS[stress])
    results = run_engine(engine, prompts, GREEDY)
    check_against_hf(path, results, prompts, hf_greedy(path, prompts, MAX_TOKENS))
    if stress == "preemption":
        assert engine.scheduler.total_preemptions > 0
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1


def _read(arch: str, hf_arch: str) -> ModelConfig:
    return ModelConfig.from_hf_dict({**hf_config(arch).to_dict(), "architectures": [hf_arch]})


def test_sliding_window_read_per_layer():
    """Mistral: every layer; Qwen2: from max_window_layers on; Gemma 2: alternating, first layer sliding."""
    assert _read("mistral_sw", "MistralForCausalLM").sliding_windows == (SLIDING_WINDOW,) * 2
    assert _read("qwen2_sw", "Qwen2ForCausalLM").sliding_windows == (0, SLIDING_WINDOW)
    assert _read("gemma2", "Gemma2ForCausalLM").sliding_windows == (SLIDING_WINDOW, 0)
    assert _read("mistral", "MistralForCausalLM").sliding_windows == ()
    legacy = {**hf_config("gemma2").to_dict(), "architectures": ["Gemma2ForCausalLM"], "layer_types": None}
    assert ModelConfig.from_hf_dict(legacy).sliding_windows == (SLIDING_WINDOW, 0)


def test_unknown_architecture_lists_supported():
    with pytest.raises(ValueError, match="Unsupported model architecture.*Gemma2ForCausalLM.*LlamaForCausalLM"):
        ModelConfig.from_hf_dict({"architectures": ["MambaForCausalLM"], "model_type": "mamba"})
