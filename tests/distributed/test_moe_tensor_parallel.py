"""Expert weights under tensor parallelism (issue 12) on CPU with gloo, fp32: every expert's intermediate dimension
split over 2 ranks (one all-reduce per MoE block, router replicated, Qwen2-MoE's shared expert split like the dense MLP
behind its replicated sigmoid gate) gives one device's greedy tokens and logprobs for tiny Mixtral, Qwen2-MoE (a dense
``mlp_only_layers`` layer) and Qwen3-MoE; pipeline stages (alone and with tp=2) keep the right sparse/dense layers;
layouts that do not split fail at startup naming the field."""

from __future__ import annotations

import pytest
import torch

from core.config import ModelConfig
from core.distributed.tensor_parallel import check_layout, shard_config, shard_weights
from tests.distributed.test_tensor_parallel import greedy_tokens, reference_tokens, save_model
from tests.tiny_models import hf_config


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moe-tp-models")


def assert_same_run(reference, ref_logprobs, tokens, logprobs):
    assert tokens == reference
    for key in reference:
        for want, got in zip(ref_logprobs[key], logprobs[key]):
            assert want.keys() == got.keys()
            assert all(abs(want[t] - got[t]) < 1e-4 for t in want)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_tp2_greedy_equals_tp1(models_dir, arch):
    path = save_model(models_dir, arch)
    reference, ref_logprobs = reference_tokens(path)
    tokens, logprobs = greedy_tokens(path, tensor_parallel_size=2)
    assert_same_run(reference, ref_logprobs, tokens, logprobs)


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "tp2-x-pp2"])
def test_moe_pp2_greedy_equals_pp1(models_dir, tp):
    """Qwen2-MoE's layer 0 is dense, layer 1 sparse: each stage builds the right kind (split over 2 ranks too)."""
    path = save_model(models_dir, "qwen2_moe")
    reference, _ = reference_tokens(path)
    tokens, _ = greedy_tokens(path, pipeline_parallel_size=2, tensor_parallel_size=tp)
    assert tokens == reference


def _config(arch: str, hf_arch: str, **overrides) -> ModelConfig:
    return ModelConfig.from_hf_dict({**hf_config(arch).to_dict(), "architectures": [hf_arch], **overrides})


def test_moe_layouts_that_do_not_split_are_named():
    with pytest.raises(ValueError, match="moe_intermediate_size=33 is not divisible"):
        check_layout(_config("qwen3_moe", "Qwen3MoeForCausalLM", moe_intermediate_size=33), 2)
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=47 is not divisible"):
        check_layout(_config("qwen2_moe", "Qwen2MoeForCausalLM", shared_expert_intermediate_size=47), 2)
    with pytest.raises(ValueError, match="intermediate_size=33 is not divisible"):  # Mixtral: the experts' width
        check_layout(_config("mixtral", "MixtralForCausalLM", intermediate_size=33), 2)
    # Qwen3-MoE with every layer sparse never builds the dense MLP: its width need not split
    all_sparse = _config("qwen3_moe", "Qwen3MoeForCausalLM", decoder_sparse_step=1, intermediate_size=33)
    check_layout(all_sparse, 2)
    part = shard_config(all_sparse, 2)
    assert (part.moe_intermediate_size, part.num_experts) == (16, 8)


def test_fused_expert_tensors_are_cut_like_per_expert_ones():
    """transformers 5's fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``: each rank gets every expert's
    rows of gate and of up (in that order) and the matching columns of down, as from the per-expert tensors."""
    cfg = _config("qwen3_moe", "Qwen3MoeForCausalLM")
    experts, inter, hidden = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    gate_up = torch.randn(experts, 2 * inter, hidden)
    down = torch.randn(experts, hidden, inter)
    prefix = "model.layers.1.mlp.experts"
    per_expert = [(f"{prefix}.{e}.{which}.weight", t) for e in range(experts) for which, t in (
        ("gate_proj", gate_up[e, :inter]), ("up_proj", gate_up[e, inter:]), ("down_proj", down[e]))]
    for rank in range(2):
        fused = dict(shard_weights([(f"{prefix}.gate_up_proj", gate_up), (f"{prefix}.down_proj", down)], cfg, rank, 2))
        split = dict(shard_weights(per_expert, cfg, rank, 2))
        for e in range(experts):
            gate, up = split[f"{prefix}.{e}.gate_proj.weight"], split[f"{prefix}.{e}.up_proj.weight"]
            assert gate.shape == (inter // 2, hidden)
            assert torch.equal(fused[f"{prefix}.gate_up_proj"][e], torch.cat([gate, up]))
            assert torch.equal(fused[f"{prefix}.down_proj"][e], split[f"{prefix}.{e}.down_proj.weight"])
        rows = slice(rank * inter // 2, (rank + 1) * inter // 2)
        assert torch.equal(split[f"{prefix}.0.gate_proj.weight"], gate_up[0, rows])
