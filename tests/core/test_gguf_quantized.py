"""GGUF weights kept in their blocks, on a tiny Llama GGUF written here with every kernel type (Q4_0, Q4_1, Q8_0,
Q4_K, Q5_K, Q6_K), an untied quantized LM head, a Q8_0 token embedding and merged projections whose parts have
different types (dequantized at load): the kept-quantized engine holds the blocks, its logprobs and greedy tokens
match the same file dequantized at load (CPU: the torch reference, dequantizing per call)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from core.layers.quantization import weight_bytes
from core.layers.quantization.gguf import repack_for_int4_kernels
from ipc.messages import SamplingParams
from tests.core.engine_utils import make_engine, run_engine
from tests.kernels.test_gguf_gemm import random_blocks

HIDDEN, INTER, VOCAB, LAYERS = 256, 512, 384, 2
PROMPTS = [[5, 17, 33, 2, 99, 140], [7] * 3, list(range(40, 60))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)
# per layer: q, k, v, o, gate, up, down. Layer 1 mixes types inside both merges (kept as dequantized weights).
LAYER_TYPES = [
    dict(attn_q=T.Q4_K, attn_k=T.Q4_K, attn_v=T.Q4_K, attn_output=T.Q5_K, ffn_gate=T.Q6_K, ffn_up=T.Q6_K,
         ffn_down=T.Q8_0),
    dict(attn_q=T.Q4_0, attn_k=T.Q4_1, attn_v=T.Q4_0, attn_output=T.Q4_1, ffn_gate=T.Q8_0, ffn_up=T.Q4_0,
         ffn_down=T.Q5_K),
]
SHAPES = dict(attn_q=(HIDDEN, HIDDEN), attn_k=(128, HIDDEN), attn_v=(128, HIDDEN), attn_output=(HIDDEN, HIDDEN),
              ffn_gate=(INTER, HIDDEN), ffn_up=(INTER, HIDDEN), ffn_down=(HIDDEN, INTER))
SCALE = {T.Q4_0: 0.02, T.Q4_1: 0.02, T.Q8_0: 0.003, T.Q4_K: 5e-4, T.Q5_K: 3e-4, T.Q6_K: 3e-4}


def write_tiny_gguf(path: Path, layer_types: list[dict] = LAYER_TYPES) -> Path:
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(15)  # llama.cpp's Q4_K_M: a quantized file (runs in bfloat16 by default)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    seed = iter(range(1000))

    def add(name: str, ggml_type: T, rows: int, cols: int) -> None:
        raw = random_blocks(int(ggml_type), rows, cols, seed=next(seed), scale=SCALE[ggml_type])
        writer.add_tensor(name, raw, raw_dtype=ggml_type)  # byte shape [rows, row_bytes]

    add("token_embd.weight", T.Q8_0, VOCAB, HIDDEN)
    add("output.weight", T.Q6_K, VOCAB, HIDDEN)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for layer, types in enumerate(layer_types):
        for kind, ggml_type in types.items():
            add(f"blk.{layer}.{kind}.weight", ggml_type, *SHAPES[kind])
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-q.gguf")


@pytest.fixture(scope="module")
def runs(tiny_gguf):
    quantized = make_engine(tiny_gguf, quantization="gguf", skip_tokenizer_init=True, dtype="float32")
    dequantized = make_engine(tiny_gguf, skip_tokenizer_init=True, dtype="float32")
    return quantized, dequantized, run_engine(quantized, PROMPTS, GREEDY), run_engine(dequantized, PROMPTS, GREEDY)


def test_kept_tensors_stay_in_their_blocks(runs):
    quantized, dequantized, _, _ = runs
    model = quantized.runner.model
    layer0, layer1 = model.model.layers
    assert layer0.self_attn.qkv_proj.weight.dtype == torch.uint8  # Q4_K q/k/v merged in blocks
    assert layer0.mlp.gate_up_proj.weight.dtype == torch.uint8  # Q6_K gate/up
    assert layer0.mlp.down_proj.ggml_type == int(T.Q8_0)
    assert layer1.self_attn.o_proj.ggml_type == int(T.Q4_1)
    assert layer1.mlp.down_proj.ggml_type == int(T.Q5_K)
    # mixed-type merges are dequantized at load
    assert layer1.self_attn.qkv_proj.weight.dtype == torch.float32
    assert layer1.mlp.gate_up_proj.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.uint8 and model.lm_head.weight.dtype == torch.uint8
    assert weight_bytes(model) < weight_bytes(dequantized.runner.model) / 2  # layer 1 q/k/v and gate/up dequantized
    assert quantized.runner.model_config.quantization.name == "gguf"
    assert dequantized.runner.model_config.quantization is None  # CPU default: dequantized at load


def test_logprobs_and_greedy_tokens_match_dequantized_file(runs):
    _, _, ours, reference = runs
    for key, expected in reference.items():
        assert ours[key]["tokens"] == expected["tokens"]
        first, ref_first = ours[key]["logprobs"][0], expected["logprobs"][0]
        for token, logprob in ref_first.items():
            assert first[token] == pytest.approx(logprob, abs=1e-3)


@pytest.mark.parametrize("v_type", [T.Q6_K, T.Q4_K], ids=["v-Q6_K-rows-differ", "v-Q4_K-rows-of-Q4_0-size"])
def test_qkv_whose_v_has_its_own_type_is_dequantized(tmp_path, v_type):
    """Q4_K_M files raise some layers' attn_v to Q6_K: q and k of one type, v of another. The merged qkv projection
    (one GGML type) cannot hold them, so the three are dequantized at load and the file computes what it
    dequantized computes (a v of Q4_K beside q / k of Q4_0 has the same row bytes: kept, it would be read as
    Q4_0)."""
    q_type = T.Q4_K if v_type == T.Q6_K else T.Q4_0
    types = [dict(layer, attn_q=q_type, attn_k=q_type, attn_v=v_type) for layer in LAYER_TYPES]
    path = write_tiny_gguf(tmp_path / "mixed-v.gguf", types)
    kept = make_engine(path, skip_tokenizer_init=True, dtype="float32", quantization="gguf")
    assert not any(name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))
                   for name in kept.runner.model_config.quantization.kept)  # fmt: skip
    reference = make_engine(path, skip_tokenizer_init=True, dtype="float32")
    ours, theirs = run_engine(kept, PROMPTS, GREEDY), run_engine(reference, PROMPTS, GREEDY)
    for key, expected in theirs.items():
        assert ours[key]["tokens"] == expected["tokens"]


def test_gguf_flags_conflict_and_non_gguf_model(tiny_gguf, tmp_path):
    with pytest.raises(ValueError, match="--gguf-dequantize"):
        make_engine(tiny_gguf, quantization="gguf", gguf_dequantize=True, skip_tokenizer_init=True)
    from tests.tiny_models import make_tiny_model

    directory = make_tiny_model(tmp_path / "llama", "llama")
    with pytest.raises(ValueError, match="needs a .gguf model file"):
        make_engine(directory, quantization="gguf", skip_tokenizer_init=True)


@pytest.mark.parametrize("layer_index, name, ggml_type", [(1, "o_proj", T.Q4_1), (0, "qkv_proj", T.Q4_K)])
def test_q4_layer_repacked_for_the_int4_kernels_computes_the_same(runs, layer_index, name, ggml_type):
    """What loading does on CUDA (``process_weights_after_loading``): a Q4_1 layer's (Q4_K's: merged q / k / v)
    blocks replaced by the int4 kernels' ``qweight`` / ``scales`` / ``zeros``; the layer computes what its blocks did
    (CPU: both references)."""
    quantized = runs[0]
    layer = copy.deepcopy(getattr(quantized.runner.model.model.layers[layer_index].self_attn, name))
    assert layer.ggml_type == int(ggml_type)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(3))
    before = layer(x)
    assert repack_for_int4_kernels(layer, int(ggml_type))
    assert not hasattr(layer, "weight") and layer.qweight.dtype == torch.int32
    assert layer.scales.shape == layer.zeros.shape == (HIDDEN // 32, layer.qweight.shape[0])
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
