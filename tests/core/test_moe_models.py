"""HF parity for the mixtures of experts (issue 12) on tiny random models: Mixtral (all layers sparse, renormalised
top-2), Qwen2-MoE (shared expert behind its sigmoid gate, no renormalisation, a dense ``mlp_only_layers`` layer) and
Qwen3-MoE (q/k norm, top-3 of 8 renormalised, ``decoder_sparse_step=2``): greedy ids identical to transformers'
generate, top-5 logprobs close, mixed lengths in one batch, and under chunked prefill."""

from __future__ import annotations

import pytest

from core.config import ModelConfig
from core.models.mixtral import MoeConfig
from tests.core.engine_utils import make_engine, run_engine
from tests.core.test_model_parity import GREEDY, MAX_TOKENS, check_against_hf, random_prompts
from tests.tiny_models import hf_config, hf_greedy, make_tiny_model

MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-moe")


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_greedy_matches_hf(models_dir, arch):
    path = make_tiny_model(models_dir, arch, 0)
    prompts = random_prompts(3, lengths=(1, 5, 16, 23, 40))
    engine = make_engine(path)
    results = run_engine(engine, prompts, GREEDY)
    check_against_hf(path, results, prompts, hf_greedy(path, prompts, MAX_TOKENS))
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_greedy_matches_hf_chunked_prefill(models_dir, arch):
    path = make_tiny_model(models_dir, arch, 0)
    prompts = random_prompts(4, lengths=(14, 3, 30, 9))
    engine = make_engine(path, max_num_batched_tokens=8)
    results = run_engine(engine, prompts, GREEDY)
    check_against_hf(path, results, prompts, hf_greedy(path, prompts, MAX_TOKENS))


def _read(arch: str, hf_arch: str, **overrides) -> MoeConfig:
    return ModelConfig.from_hf_dict({**hf_config(arch).to_dict(), "architectures": [hf_arch], **overrides})


def test_moe_config_reading():
    mixtral = _read("mixtral", "MixtralForCausalLM")
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_intermediate_size) == (4, 2, 32)
    assert mixtral.norm_topk_prob and mixtral.sparse_layers == (True, True)
    qwen2 = _read("qwen2_moe", "Qwen2MoeForCausalLM")
    assert qwen2.sparse_layers == (False, True) and not qwen2.norm_topk_prob and qwen2.qkv_bias
    assert qwen2.shared_expert_intermediate_size == 48 and qwen2.intermediate_size == 128
    qwen3 = _read("qwen3_moe", "Qwen3MoeForCausalLM")
    assert qwen3.sparse_layers == (False, True) and qwen3.qk_norm and qwen3.norm_topk_prob
    real = _read("qwen3_moe", "Qwen3MoeForCausalLM", num_hidden_layers=4, decoder_sparse_step=1, mlp_only_layers=[2])
    assert real.sparse_layers == (True, True, False, True)


@pytest.mark.parametrize("overrides, match", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias"),
])  # fmt: skip
def test_moe_unsupported_config_fields_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        _read("qwen3_moe", "Qwen3MoeForCausalLM", **overrides)


def test_moe_checkpoint_missing_an_expert_is_named(models_dir):
    """A checkpoint without one expert's tensors leaves rows of the stacked weight empty: a load error, not zeros."""
    import torch
    from safetensors.torch import load_file

    from core.models.registry import model_class

    path = make_tiny_model(models_dir, "mixtral", 0)
    cfg = ModelConfig.from_hf_dict({**hf_config("mixtral").to_dict(), "architectures": ["MixtralForCausalLM"]})
    model = model_class(cfg)(cfg, kernel_backend="torch")
    tensors = load_file(path / "model.safetensors")
    model.load_weights(tensors.items())
    expert3 = model.model.layers[1].mlp.w13.view(4, 64, 64)[3, 32:]
    assert torch.equal(expert3, tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"])
    partial = {k: v for k, v in tensors.items() if "experts.2.w3" not in k}
    with pytest.raises(ValueError, match="missing.*mlp.w13"):
        model_class(cfg)(cfg, kernel_backend="torch").load_weights(partial.items())
