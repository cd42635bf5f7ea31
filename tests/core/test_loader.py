"""Loader: HF config dicts and HF-named weights from GGUF, safetensors and pytorch_model.bin checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from core.gguf import GGUFFile
from core.loader import iter_weights, load_hf_config, resolve_load_format
from core.model_source import ModelSource, resolve_model

SMOLLM2_REFERENCE = Path(__file__).parents[1] / "data" / "smollm2-135m"

# Keys that decide the computation; everything else in a config (transformers_version, initializer_range...) not.
ARCH_KEYS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "attention_bias", "hidden_act", "mlp_bias",
)


def rope_theta_of(config: dict) -> float:
    return config["rope_theta"] if "rope_theta" in config else config["rope_parameters"]["rope_theta"]


# --------------------------------------------------------------------------------------------------------------
# The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF)


@pytest.fixture(scope="module")
def smollm2() -> ModelSource:
    return resolve_model(None)


@pytest.fixture(scope="module")
def transformers_smollm2_state(transformers_smollm2) -> dict[str, torch.Tensor]:
    """transformers' own GGUF dequantization of the same file (tests/conftest.py loads it once per session)."""
    return transformers_smollm2.state_dict()


def test_gguf_config_matches_hf_config(smollm2):
    ours = load_hf_config(smollm2)
    reference = json.loads((SMOLLM2_REFERENCE / "config.json").read_text())
    for key in ARCH_KEYS:
        assert ours[key] == reference[key], key
    assert math.isclose(ours["rms_norm_eps"], reference["rms_norm_eps"], rel_tol=1e-6)
    assert rope_theta_of(ours) == rope_theta_of(reference)
    assert ours["rope_scaling"] is None


def test_gguf_weights_equal_transformers_dequantization(smollm2, transformers_smollm2_state):
    ours = dict(iter_weights(smollm2))
    expected = dict(transformers_smollm2_state)
    assert torch.equal(expected.pop("lm_head.weight"), expected["model.embed_tokens.weight"])  # tied, not stored
    assert sorted(ours) == sorted(expected)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu", name
        assert tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, expected[name]), name


# --------------------------------------------------------------------------------------------------------------
# Tiny GGUF files written here the way llama.cpp's convert_hf_to_gguf.py writes them


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


def gguf_tensor_name(hf_name: str) -> str:
    short = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in short:
        return short[hf_name]
    layer = hf_name.split(".")[2]
    rest = ".".join(hf_name.split(".")[3:])
    per_layer = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{per_layer[module]}.{kind}"


MATRIX_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16, Q.F32]


def write_tiny_gguf(path: Path, arch: str, model: torch.nn.Module, rope_freqs: np.ndarray | None = None):
    """Write ``model`` as llama.cpp would; return the HF-layout tensors a correct loader must give back."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(7)  # MOSTLY_Q8_0
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    expected = {}
    matrices = 0
    for name, weight in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = weight.float().numpy()
        n_head = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(name.split(".")[-2])
        rows = np.arange(array.shape[0])
        if arch == "llama" and n_head:
            array = llama_cpp_permute(array, n_head)
            rows = llama_cpp_permute(rows, n_head)
        if array.ndim == 1:
            qtype = Q.F32
        elif name == "model.embed_tokens.weight":
            qtype = Q.Q8_0
        else:
            qtype = MATRIX_TYPES[matrices % len(MATRIX_TYPES)]
            matrices += 1
        if qtype == Q.F32:
            stored = array
        elif qtype == Q.F16:
            stored = array.astype(np.float16)
        else:
            stored = quantize(array, qtype)
        writer.add_tensor(gguf_tensor_name(name), stored, raw_dtype=qtype if stored.dtype == np.uint8 else None)
        round_trip = stored if qtype == Q.F32 else dequantize(stored, qtype).astype(np.float32)
        expected[name] = torch.from_numpy(round_trip[np.argsort(rows)].copy())  # undo the permutation
        assert torch.allclose(expected[name], weight.float(), atol=0.05), name  # the quantization is sane
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, vocab_size=320, max_position_embeddings=131072, bos_token_id=1,
                  eos_token_id=2, rms_norm_eps=1e-6)
    if arch == "llama":  # GQA, untied lm_head, 64 rotary frequencies so Llama 3 scaling has a smooth band
        config = transformers.LlamaConfig(
            hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
            tie_word_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192},
            **common,
        )
        model = transformers.LlamaForCausalLM(config)
    elif arch == "qwen2":  # q/k/v biases, tied embeddings
        config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=2, tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(config)
    else:  # qwen3: q/k norms, head_dim != hidden_size / heads
        config = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, **common)
        model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():  # norms initialise to ones; make them informative
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(torch.randn_like(param))
    return model.eval()


def llama3_rope_freqs(config) -> np.ndarray:
    """What llama.cpp stores for Llama 3 scaling: default inverse frequencies over the scaled ones (via HF)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = config.head_dim
    base = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return (base / scaled).numpy()


@pytest.fixture(scope="module")
def build_tiny_gguf(tmp_path_factory):
    """arch -> (source, HF model, expected tensors); each file written once per module."""
    built = {}

    def build(arch: str):
        if arch not in built:
            model = tiny_model(arch)
            path = tmp_path_factory.mktemp(arch) / f"tiny-{arch}.gguf"
            rope_freqs = llama3_rope_freqs(model.config) if arch == "llama" else None
            expected = write_tiny_gguf(path, arch, model, rope_freqs)
            built[arch] = resolve_model(str(path)), model, expected
        return built[arch]

    return build


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def tiny_gguf(request, build_tiny_gguf):
    return build_tiny_gguf(request.param)


def test_tiny_gguf_weights_round_trip(tiny_gguf):
    source, model, expected = tiny_gguf
    ours = dict(iter_weights(source))
    assert sorted(ours) == sorted(expected)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_tiny_gguf_config_matches_model_config(tiny_gguf):
    source, model, _ = tiny_gguf
    ours = load_hf_config(source)
    reference = model.config.to_dict()
    reference["attention_bias"] = model.config.model_type == "qwen2"  # Qwen2's biases are implicit in HF
    reference["mlp_bias"] = False
    reference.setdefault("head_dim", model.config.hidden_size // model.config.num_attention_heads)
    for key in ARCH_KEYS:
        if key != "architectures":
            assert ours[key] == reference[key], key
    assert ours["architectures"] == [type(model).__name__]
    assert math.isclose(ours["rms_norm_eps"], reference["rms_norm_eps"], rel_tol=1e-6)
    assert ours["rope_theta"] == rope_theta_of(reference)


def test_llama3_rope_scaling_recovered_from_rope_freqs(build_tiny_gguf):
    source, model, _ = build_tiny_gguf("llama")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ours = load_hf_config(source)
    assert ours["rope_scaling"]["rope_type"] == "llama3"
    rebuilt = transformers.LlamaConfig(**{k: v for k, v in ours.items() if k not in ("architectures", "model_type")})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    got, _ = ROPE_INIT_FUNCTIONS["llama3"](rebuilt, "cpu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_gguf_unsupported_architecture_raises(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = resolve_model(str(tmp_path / "m.gguf"))
    with pytest.raises(ValueError, match="'mamba'.*supported:.*gemma2.*gpt2.*llama"):
        load_hf_config(source)
    with pytest.raises(ValueError, match="mamba"):
        iter_weights(source)


def test_gguf_reader_agrees_with_gguf_py_on_every_type(tmp_path):
    """Our fast header parser and tensor views against gguf-py's reader, incl. K-quants (random blocks)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("test.u32", 7)
    writer.add_float32("test.f32", 0.25)
    writer.add_string("test.str", "héllo")
    writer.add_array("test.strs", ["a", "ü", ""])
    writer.add_array("test.ints", [3, 1, 2])
    types = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.Q8_0, Q.Q4_0, Q.F16, Q.F32, Q.BF16]
    for i, qtype in enumerate(types):
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = 3, 512
        if qtype in (Q.F16, Q.F32):
            data = rng.standard_normal((rows, cols)).astype(np.float16 if qtype == Q.F16 else np.float32)
            writer.add_tensor(f"t{i}", data)
        else:
            raw = rng.integers(0, 256, (rows, cols // block * type_size), dtype=np.uint8)
            if qtype not in (Q.BF16,):  # keep f16 block scales finite: clear the exponent's top bit of every byte
                raw &= 0xBF
            writer.add_tensor(f"t{i}", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = GGUFFile(path)
    reference = gguf.GGUFReader(str(path))
    assert ours.metadata["test.u32"] == 7 and ours.metadata["test.f32"] == 0.25
    assert ours.metadata["test.str"] == "héllo" and ours.metadata["test.strs"] == ["a", "ü", ""]
    assert ours.metadata["test.ints"].tolist() == [3, 1, 2]
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    for tensor in reference.tensors:
        want = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        got = ours.to_float32(tensor.name)
        assert got.shape == want.shape == (3, 512), tensor.name
        np.testing.assert_array_equal(got, want, err_msg=tensor.name)


# --------------------------------------------------------------------------------------------------------------
# safetensors and pytorch_model.bin


def saved_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # save_pretrained does not store tied weights
    return state


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sharded_safetensors_round_trip(arch, tmp_path):
    model = tiny_model(arch).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    source = resolve_model(str(tmp_path))
    assert resolve_load_format(source) == "safetensors"
    ours = dict(iter_weights(source))
    expected = saved_state(model)
    assert sorted(ours) == sorted(expected)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name]), name


def test_index_wins_over_stray_safetensors(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    from safetensors.torch import save_file

    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, str(tmp_path / "consolidated.safetensors"))
    assert sorted(dict(iter_weights(resolve_model(str(tmp_path))))) == sorted(saved_state(model))


def test_single_safetensors_file(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = dict(iter_weights(resolve_model(str(tmp_path)), load_format="safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in saved_state(model).items()}


def test_pytorch_bin_fallback(tmp_path):
    model = tiny_model("qwen3")
    model.config.save_pretrained(tmp_path)
    state = saved_state(model)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints carry these buffers
    torch.save(state, tmp_path / "pytorch_model.bin")
    source = resolve_model(str(tmp_path))
    assert resolve_load_format(source) == "pt"
    ours = dict(iter_weights(source))
    expected = saved_state(model)
    assert sorted(ours) == sorted(expected)
    assert all(torch.equal(ours[k], expected[k]) for k in expected)


def test_unknown_load_format_raises(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="Unknown load_format 'npz'.*auto, safetensors, gguf, pt"):
        iter_weights(resolve_model(str(tmp_path)), load_format="npz")


def test_missing_weights_raise(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    source = resolve_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="No weights"):
        iter_weights(source)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        iter_weights(source, load_format="safetensors")


# --------------------------------------------------------------------------------------------------------------
# Config from a directory


def test_directory_config_takes_eos_list_from_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 2, "hidden_size": 8}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    config = load_hf_config(resolve_model(str(tmp_path)))
    assert config["eos_token_id"] == [2, 7, 9]
    assert config["hidden_size"] == 8


def test_directory_config_without_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "eos_token_id": 5}))
    assert load_hf_config(resolve_model(str(tmp_path)))["eos_token_id"] == 5


def test_reference_smollm2_directory_config():
    config = load_hf_config(ModelSource(name="smollm2", path=str(SMOLLM2_REFERENCE)))
    assert config["eos_token_id"] == 2 and config["num_hidden_layers"] == 30
