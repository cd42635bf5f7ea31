"""The quantization framework: method resolution, clear errors, and merged-parameter loading by layout attributes."""

from __future__ import annotations

import pytest
import torch

from core.config import ModelConfig
from core.layers.quantization import resolve_quantization, supported_methods
from core.layers.quantization.base import new_parameter
from core.models import weights as weight_utils
from ipc.config import QUANTIZATION_CHOICES, EngineConfig, engine_config_from_kwargs


def llama_dict(**extra):
    d = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    d.update(extra)
    return d


def test_engine_choices_match_the_registry():
    from core.layers.quantization import REQUESTED_ALIASES
    from ipc.config import QUANTIZATION_ALIASES, QUANTIZATION_METHODS

    assert sorted(QUANTIZATION_METHODS) == supported_methods()
    assert sorted(QUANTIZATION_ALIASES) == sorted(REQUESTED_ALIASES)
    assert QUANTIZATION_CHOICES == (*QUANTIZATION_METHODS, *QUANTIZATION_ALIASES)


def test_vllm_kernel_names_run_their_checkpoints_and_are_never_applied_online():
    awq = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    d = llama_dict(quantization_config=awq)
    cfg = ModelConfig.from_hf_dict(llama_dict())
    assert resolve_quantization(cfg, d, "awq_marlin").quantization.name == "awq"
    with pytest.raises(ValueError, match="--quantization gptq_marlin needs a checkpoint quantized with gptq.*'awq'"):
        resolve_quantization(cfg, d, "gptq_marlin")
    with pytest.raises(ValueError, match="--quantization compressed-tensors needs a checkpoint quantized with "
                                         "compressed-tensors .* not quantized"):
        resolve_quantization(cfg, llama_dict(), "compressed-tensors")
    ct = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}}}
    resolved = resolve_quantization(cfg, llama_dict(quantization_config=ct), "compressed-tensors")
    assert resolved.quantization.name == "fp8"


def test_unsupported_checkpoint_method_is_named_with_the_supported_list():
    with pytest.raises(ValueError) as info:
        ModelConfig.from_hf_dict(llama_dict(quantization_config={"quant_method": "hqq", "nbits": 4}))
    message = str(info.value)
    assert "hqq" in message and "quantiz" in message
    from core.layers.quantization import CHECKPOINT_METHODS, ONLINE_ONLY_METHODS

    for method in CHECKPOINT_METHODS:  # what a checkpoint may say; experts_int8 only quantizes at load
        assert method in message
    assert not any(method in message for method in ONLINE_ONLY_METHODS)
    with pytest.raises(ValueError, match="quantized with 'experts_int8'.*does not support"):
        ModelConfig.from_hf_dict(llama_dict(quantization_config={"quant_method": "experts_int8"}))


def test_requested_method_must_match_the_checkpoint():
    d = llama_dict(quantization_config={"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                        "version": "gemm"})
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.quantization.name == "awq"
    with pytest.raises(ValueError, match="checkpoint is quantized with 'awq'"):
        resolve_quantization(cfg, d, "fp8")


def test_online_quantization_needs_a_method_that_can_quantize_at_load():
    d = llama_dict()
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.quantization is None
    assert resolve_quantization(cfg, d, "fp8").quantization.name == "fp8"
    with pytest.raises(ValueError, match="needs a checkpoint quantized with awq"):
        resolve_quantization(cfg, d, "awq")


def test_families_without_quantized_kernels_fail_at_startup():
    awq = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    gpt2 = dict(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=128, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="'awq' is not supported for GPT2LMHeadModel.*LlamaForCausalLM.*"
                                         "MixtralForCausalLM"):
        ModelConfig.from_hf_dict(dict(gpt2, quantization_config=awq))
    cfg = ModelConfig.from_hf_dict(gpt2)
    assert resolve_quantization(cfg, gpt2, "fp8").quantization.name == "fp8"  # at load: no checkpoint layout
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    with pytest.raises(ValueError, match="GPT2LMHeadModel checkpoints quantized with 'fp8' are not supported; its "
                                         "16-bit checkpoints are, quantized at load with --quantization fp8"):
        ModelConfig.from_hf_dict(dict(gpt2, quantization_config=fp8))


def test_quantization_is_an_engine_argument_not_a_not_supported_flag():
    assert engine_config_from_kwargs(quantization="fp8").quantization == "fp8"
    assert EngineConfig().quantization is None
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int3")


def test_merged_parameters_load_by_their_layout_attributes():
    """A packed [in, out/8] tensor (AWQ qweight), a [groups, out] tensor (scales), one value per shard (per-tensor
    scales) and a copy shared by every shard (g_idx) each land where their attributes say."""
    layer = torch.nn.Module()
    new_parameter(layer, "qweight", (4, 24 // 8), torch.int32, output_dim=1, pack_factor=8)
    new_parameter(layer, "scales", (2, 24), torch.float32, output_dim=1)
    new_parameter(layer, "weight_scale", (3,), torch.float32, shard_offsets=(0, 8, 16))
    new_parameter(layer, "g_idx", (4,), torch.int32, output_dim=None)
    model = torch.nn.Module()
    model.proj = layer
    shards = {"a": 0, "b": 8, "c": 16}
    tensors = []
    for shard, row in shards.items():
        tensors += [(f"{shard}.qweight", torch.full((4, 1), row, dtype=torch.int32)),
                    (f"{shard}.scales", torch.full((2, 8), float(row))),
                    (f"{shard}.weight_scale", torch.tensor(row + 0.5)),
                    (f"{shard}.g_idx", torch.tensor([0, 0, 1, 1], dtype=torch.int32))]

    def place(name, tensor):
        shard, param = name.split(".")
        return [(f"proj.{param}", shards[shard], tensor)]

    weight_utils.load_weights(model, tensors, place, "Test")
    assert layer.qweight[:, 1].eq(8).all() and layer.qweight[:, 2].eq(16).all()
    assert layer.scales[:, 8:16].eq(8).all() and layer.scales[:, 16:].eq(16).all()
    assert layer.weight_scale.tolist() == [0.5, 8.5, 16.5]
    assert layer.g_idx.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="missing"):
        weight_utils.load_weights(model, tensors[:4], place, "Test")
    bad = tensors + [("a.g_idx", torch.tensor([1, 1, 0, 0], dtype=torch.int32))]
    with pytest.raises(ValueError, match="differs"):
        weight_utils.load_weights(model, bad, place, "Test")


def test_quantization_flag_reaches_the_engine_config():
    from frontend import cli

    for argv in (["--quantization", "fp8"], ["-q", "fp8"]):
        assert cli.engine_config_from_args(cli.serve_parser().parse_args(argv)).quantization == "fp8"


def test_layers_that_cannot_use_fp8_activations_read_the_unquantized_ones():
    """``Linear`` given ``Fp8Activations`` (an RMSNorm's output with its fp8 quantization): a bf16 layer, and an fp8
    layer off the W8A8 GPU path (here the CPU reference), multiply ``x.x``; only a W8A8 layer says it takes them."""
    from core.layers.linear import Linear
    from core.layers.quantization.fp8 import Fp8Config
    from kernels.fp8_linear import Fp8Activations, quantize_activations

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, generator=gen)
    activations = Fp8Activations(x, *quantize_activations(x))
    plain = Linear(32, 16, backend="torch")
    plain.weight.data = torch.randn(16, 32, generator=gen)
    assert not plain.takes_fp8_activations()
    assert torch.equal(plain(activations), plain(x))
    fp8_layer = Linear(32, 16, backend="torch", quant_method=Fp8Config.online().linear_method("layer"))
    fp8_layer.weight.data = torch.randn(16, 32, generator=gen)
    fp8_layer.quant_method.process_weights_after_loading(fp8_layer)
    assert not fp8_layer.takes_fp8_activations()
    assert torch.equal(fp8_layer(activations), fp8_layer(x))


def test_a_pipeline_stage_matches_layer_choices_by_the_checkpoints_layer_numbers():
    """Stage 2 of 2 numbers its layers from 0; a checkpoint's per-layer choice (AWQ ``modules_to_not_convert``, an
    fp8 ignore list) names the checkpoint's layer 1."""
    from core.layers.quantization.fp8 import Fp8Config
    from core.layers.quantization.int4 import AWQConfig

    awq = AWQConfig.from_hf({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                             "version": "gemm", "modules_to_not_convert": ["model.layers.1.mlp"]})
    fp8 = Fp8Config.from_hf({"quant_method": "fp8", "ignored_layers": ["model.layers.1.mlp.down_proj"]})
    for config in (awq, fp8):
        stage = config.for_stage(1)
        assert stage.global_prefix("model.layers.0.mlp.down_proj") == "model.layers.1.mlp.down_proj"
        assert stage.linear_method("model.layers.0.mlp.down_proj") is None
        assert config.linear_method("model.layers.0.mlp.down_proj") is not None
        assert stage.linear_method("model.layers.0.self_attn.o_proj") is not None
        assert config.layer_offset == 0  # the copy is the stage's


def test_row_parallel_layers_know_their_share_of_the_input_features():
    from core.layers.quantization.int4 import GPTQConfig

    gptq = GPTQConfig.from_hf({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True})
    rank = gptq.for_tensor_parallel(2, ("o_proj", "down_proj"))
    assert rank.input_shards("model.layers.3.self_attn.o_proj") == 2
    assert rank.input_shards("model.layers.3.self_attn.q_proj") == 1
    assert rank.linear_method("model.layers.0.mlp.down_proj").input_shards == 2
    assert gptq.input_shards("model.layers.3.self_attn.o_proj") == 1


def test_unequal_groups_are_regrouped_into_padded_blocks_with_the_same_product():
    """A rank's share of an act-order layer: its rows fall unevenly into the groups (one group empty, zero points
    up to GPTQ v1's 16). Regrouped into 32-row blocks (padding rows read an appended zero column of x), the int4
    reference gives the product of the original weight."""
    from core.layers.quantization.int4 import regroup_rows
    from kernels.int4_gemm import int4_linear_ref, pack_int4_kernel

    gen = torch.Generator().manual_seed(0)
    k, n, groups = 96, 16, 5
    g_idx = torch.tensor([0] * 40 + [1] * 7 + [3] * 33 + [4] * 16)[torch.randperm(k, generator=gen)]
    q = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(1, 17, (groups, n), generator=gen)
    scales = torch.rand(groups, n, generator=gen) + 0.5
    weight = (q - zeros[g_idx]).float() * scales[g_idx]
    x = torch.randn(3, k, generator=gen)
    new_q, new_zeros, new_scales, rows, block = regroup_rows(q, zeros, scales, g_idx, torch.argsort(g_idx, stable=True))
    assert block == 32 and new_q.shape[0] == 64 + 32 + 64 + 32 and new_zeros.shape == (6, n)
    assert int((rows == k).sum()) == new_q.shape[0] - k  # the padding rows
    got = int4_linear_ref(x, pack_int4_kernel(new_q), new_scales, new_zeros.float(), block, rows.to(torch.int32))
    torch.testing.assert_close(got, x @ weight, rtol=1e-5, atol=1e-5)


def test_int4_configs_skip_the_checkpoints_unquantized_modules_by_name_or_pattern():
    """AutoAWQ's ``modules_to_not_convert`` (dotted runs of the name) and compressed-tensors' ``re:`` ignore
    patterns: those layers (and a block's experts) load as they are."""
    from core.layers.quantization.compressed_tensors import from_compressed_tensors
    from core.layers.quantization.int4 import AWQConfig

    ct = from_compressed_tensors({"quant_method": "compressed-tensors", "format": "pack-quantized",
                                  "ignore": ["lm_head", "re:.*down_proj"], "config_groups": {"group_0": {
                                      "targets": ["Linear"], "input_activations": None,
                                      "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                  "strategy": "group", "group_size": 128}}}})
    assert ct.linear_method("model.layers.0.mlp.down_proj") is None
    assert ct.linear_method("model.layers.0.mlp.gate_proj") is not None
    awq = AWQConfig.from_hf({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                             "version": "gemm", "modules_to_not_convert": ["mlp"]})
    assert awq.linear_method("model.layers.3.mlp.down_proj") is None and awq.moe_method("model.layers.3.mlp") is None
    assert awq.linear_method("model.layers.3.self_attn.o_proj") is not None


def test_compressed_tensors_schemes_for_some_layers_only_fail_naming_the_targets():
    from core.layers.quantization.compressed_tensors import from_compressed_tensors

    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["re:.*self_attn.*"], "input_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}}}}
    with pytest.raises(ValueError, match=r"targets \['re:\.\*self_attn\.\*'\] are not supported"):
        from_compressed_tensors(qc)
