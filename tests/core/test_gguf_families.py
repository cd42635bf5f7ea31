"""GGUF for every family that has a llama.cpp architecture: a tiny random HF model written as llama.cpp's
convert_hf_to_gguf.py writes it (its metadata keys, gguf-py's own tensor-name map, its convert-time changes: Gemma's
``1 + w`` norms, Falcon's and GPT-NeoX's reordered qkv, GPT-2's transposed Conv1D, Llama's Q/K permutation, Phi-3's
rope factor tensors), loaded by the engine and run against transformers on the safetensors copy: greedy ids identical,
top-5 logprobs close. Matrices are rounded to fp16 before saving, so storing them as F16 loses nothing."""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
import pytest
import torch
import transformers

from tests.core.engine_utils import make_engine, run_engine
from tests.core import test_quantized_checkpoints as qc
from tests.core.test_loader import llama_cpp_permute
from tests.kernels.test_gguf_codebook import WRITERS as IQ4_WRITERS
from tests.kernels.test_gguf_gemm import quantize_q4_k, quantize_q6_k
from tests.core.test_model_parity import GREEDY, MAX_TOKENS, check_against_hf, random_prompts
from tests.tiny_models import SLIDING_WINDOW, hf_config, hf_greedy

# test name -> (tiny_models arch, GGUF architecture, config overrides a GGUF can express)
FAMILIES = {
    "gemma": ("gemma", "gemma", {}),
    # llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim) (27B: hidden/heads); no GGUF key says otherwise
    "gemma2": ("gemma2", "gemma2", {"query_pre_attn_scalar": 16}),
    "gemma3": ("gemma3", "gemma3", {"query_pre_attn_scalar": 16}),
    "phi3": ("phi3", "phi3", {}),
    "falcon_40b_style": ("falcon", "falcon", {}),
    "falcon_7b_style": ("falcon_mq", "falcon", {}),
    "gpt_neox": ("gpt_neox", "gptneox", {}),
    "gpt2": ("gpt2", "gpt2", {}),
    "starcoder2": ("starcoder2", "starcoder2", {}),
    "mistral_sw": ("mistral_sw", "llama", {}),
    "qwen2": ("qwen2", "qwen2", {}),
    "qwen3": ("qwen3", "qwen3", {}),
    # mixtures of experts in llama.cpp's stacked layout; its qwen2moe / qwen3moe have no dense layers
    "mixtral": ("mixtral", "llama", {}),
    "qwen2_moe": ("qwen2_moe", "qwen2moe", {"mlp_only_layers": []}),
    "qwen3_moe": ("qwen3_moe", "qwen3moe", {"decoder_sparse_step": 1}),
}
LENGTHS = (1, 5, SLIDING_WINDOW, 17, 40)


def _tiny_hf_model(arch: str, overrides: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # norms and biases informative (HF initialises them to 1 / 0)
                param.copy_(torch.randn_like(param) * 0.2 + (0.0 if "bias" in name or "gemma" in arch else 1.0))
            else:  # exactly representable in fp16
                param.copy_(param.half().float())
    return model


def _metadata(writer: gguf.GGUFWriter, gguf_arch: str, cfg) -> None:
    """The keys convert_hf_to_gguf.py writes for the family."""
    d = cfg.to_dict()
    hidden = d.get("hidden_size") or d["n_embd"]
    heads = d.get("num_attention_heads") or d["n_head"]
    writer.add_block_count(d.get("num_hidden_layers") or d["n_layer"])
    writer.add_embedding_length(hidden)
    writer.add_head_count(heads)
    writer.add_context_length(d.get("max_position_embeddings") or d["n_positions"])
    writer.add_file_type(1)  # MOSTLY_F16
    writer.add_bos_token_id(d["bos_token_id"])
    writer.add_eos_token_id(d["eos_token_id"])
    rope = d.get("rope_parameters") or {}
    if gguf_arch == "falcon":
        writer.add_feed_forward_length(d["ffn_hidden_size"])
        writer.add_head_count_kv(d["num_kv_heads"] if d["new_decoder_architecture"] else 1)
        writer.add_layer_norm_eps(d["layer_norm_epsilon"])
        return
    if gguf_arch == "gpt2":
        writer.add_feed_forward_length(4 * hidden)
        writer.add_layer_norm_eps(d["layer_norm_epsilon"])
        return
    writer.add_feed_forward_length(d["intermediate_size"])
    if gguf_arch == "gptneox":
        writer.add_rope_dimension_count(int(rope["partial_rotary_factor"] * (hidden // heads)))
        writer.add_parallel_residual(d["use_parallel_residual"])
        writer.add_layer_norm_eps(d["layer_norm_eps"])
        return
    writer.add_head_count_kv(d["num_key_value_heads"])
    head_dim = d.get("head_dim") or hidden // heads
    if gguf_arch == "starcoder2":
        writer.add_layer_norm_eps(d["norm_epsilon"])
    else:
        writer.add_layer_norm_rms_eps(d["rms_norm_eps"])
    if gguf_arch.startswith("gemma"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if gguf_arch == "gemma2":
        writer.add_attn_logit_softcapping(d["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(d["final_logit_softcapping"])
        writer.add_sliding_window(d["sliding_window"])
    if gguf_arch == "gemma3":
        full = rope["full_attention"]
        writer.add_rope_freq_base(full["rope_theta"])
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
        writer.add_sliding_window(d["sliding_window"])
        writer.add_sliding_window_pattern(2)  # the tiny model: sliding, global
    elif gguf_arch in ("llama", "qwen2", "qwen3", "starcoder2", "phi3", "qwen2moe", "qwen3moe"):
        writer.add_rope_freq_base(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    if d.get("num_local_experts") or d.get("num_experts"):
        writer.add_expert_count(d.get("num_local_experts") or d["num_experts"])
        writer.add_expert_used_count(d["num_experts_per_tok"])
    if gguf_arch in ("qwen2moe", "qwen3moe"):
        writer.add_expert_feed_forward_length(d["moe_intermediate_size"])
    if gguf_arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(d["shared_expert_intermediate_size"])
    if gguf_arch == "qwen3moe":  # convert_hf_to_gguf.py writes a head_dim the config gives
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if gguf_arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if gguf_arch in ("llama", "starcoder2") and d.get("sliding_window"):
        writer.add_sliding_window(d["sliding_window"])
    if gguf_arch == "phi3":
        rotary_dims = int(rope["partial_rotary_factor"] * hidden) // heads
        original = d["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_dimension_count(rotary_dims)
        writer.add_sliding_window(d["sliding_window"])
        scale = d["max_position_embeddings"] / original
        writer.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(original))))


def _convert(gguf_arch: str, cfg, hf_name: str, array: np.ndarray) -> np.ndarray:
    """convert_hf_to_gguf.py's per-family tensor changes."""
    if gguf_arch.startswith("gemma") and hf_name.endswith("norm.weight"):
        return array + 1
    if gguf_arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads
        return llama_cpp_permute(array, heads)
    if gguf_arch == "falcon" and "query_key_value" in hf_name:
        n_head = cfg.num_attention_heads
        n_head_kv = cfg.num_kv_heads if cfg.new_decoder_architecture else 1
        head_dim = cfg.hidden_size // n_head
        qkv = array.reshape(n_head_kv, n_head // n_head_kv + 2, head_dim, *array.shape[1:])
        q = qkv[:, :-2].reshape(n_head * head_dim, *array.shape[1:])
        k = qkv[:, [-2]].reshape(n_head_kv * head_dim, *array.shape[1:])
        v = qkv[:, [-1]].reshape(n_head_kv * head_dim, *array.shape[1:])
        return np.concatenate([q, k, v])
    if gguf_arch == "gptneox" and "query_key_value" in hf_name:
        n_head = cfg.num_attention_heads
        qkv = array.reshape(n_head, 3, cfg.hidden_size // n_head, *array.shape[1:])
        return np.concatenate([qkv[:, i].reshape(-1, *array.shape[1:]) for i in range(3)])
    if gguf_arch == "gpt2" and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        return np.ascontiguousarray(array.T)
    return array


def _add_matrix(writer: gguf.GGUFWriter, name: str, array: np.ndarray, ggml_type: gguf.GGMLQuantizationType | None
                ) -> None:  # fmt: skip
    """A weight matrix (or a stack of experts' matrices) in F16, or quantized to ``ggml_type``."""
    k_quant = ggml_type in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K,
                            gguf.GGMLQuantizationType.IQ4_XS)
    if ggml_type is None or array.shape[-1] % (256 if k_quant else 32):  # llama.cpp: rows of partial blocks in F16
        writer.add_tensor(name, array.astype(np.float16))
    elif ggml_type in IQ4_WRITERS:  # gguf-py writes no IQ types
        writer.add_tensor(name, IQ4_WRITERS[ggml_type](array), raw_dtype=ggml_type)
    elif k_quant:  # gguf-py writes no K-quants
        quantize = quantize_q4_k if ggml_type == gguf.GGMLQuantizationType.Q4_K else quantize_q6_k
        writer.add_tensor(name, quantize(array), raw_dtype=ggml_type)
    else:
        writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), ggml_type), raw_dtype=ggml_type)


def write_family_gguf(path, gguf_arch: str, model: torch.nn.Module, matrices: gguf.GGMLQuantizationType | None = None
                      ) -> None:  # fmt: skip
    """``matrices``: store the 2-D weights in that GGML type (llama.cpp's quantized files) instead of F16."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    _metadata(writer, gguf_arch, cfg)
    n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[{v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[gguf_arch].name],
                                     n_layers)  # fmt: skip
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, weight in model.state_dict().items():
        if tied and hf_name in ("lm_head.weight", "embed_out.weight"):
            continue
        if hf_name.endswith(".mlp.experts.gate_up_proj"):  # [E, 2I, H]: llama.cpp's gate and up stacks
            layer = names.get_name(hf_name.replace("gate_up_proj", "gate_proj")).removesuffix(".ffn_gate_exps")
            halves = weight.float().numpy().reshape(weight.shape[0], 2, -1, weight.shape[2])
            _add_matrix(writer, f"{layer}.ffn_gate_exps.weight", np.ascontiguousarray(halves[:, 0]), matrices)
            _add_matrix(writer, f"{layer}.ffn_up_exps.weight", np.ascontiguousarray(halves[:, 1]), matrices)
            continue
        if hf_name.endswith(".mlp.experts.down_proj"):  # [E, H, I]
            _add_matrix(writer, f"{names.get_name(hf_name)}.weight", weight.float().numpy(), matrices)
            continue
        if hf_name.endswith(".mlp.shared_expert_gate.weight"):  # llama.cpp's shape: [hidden]
            writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight",)), weight.float().numpy().reshape(-1))
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        array = _convert(gguf_arch, cfg, hf_name, weight.float().numpy())
        if matrices is not None and array.ndim == 2:
            _add_matrix(writer, gguf_name, array, matrices)
            continue
        writer.add_tensor(gguf_name, array if array.ndim == 1 else array.astype(np.float16))
        if gguf_arch == "gpt2" and gguf_name == "token_embd.weight":  # the converter writes the tied head out
            writer.add_tensor("output.weight", array.astype(np.float16))
    if gguf_arch == "phi3":
        rope = cfg.rope_parameters
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_gguf_matches_hf(tmp_path, family):
    arch, gguf_arch, overrides = FAMILIES[family]
    model = _tiny_hf_model(arch, overrides)
    model.save_pretrained(tmp_path / "hf")
    write_family_gguf(tmp_path / f"{family}.gguf", gguf_arch, model)
    prompts = random_prompts(7, lengths=LENGTHS)
    engine = make_engine(tmp_path / f"{family}.gguf")
    results = run_engine(engine, prompts, GREEDY)
    check_against_hf(tmp_path / "hf", results, prompts, hf_greedy(tmp_path / "hf", prompts, MAX_TOKENS))


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "phi3", "starcoder2"])
def test_family_gguf_kept_in_its_blocks_equals_it_dequantized(tmp_path, family):
    """``--quantization gguf`` on the families whose linear weights llama.cpp stores unchanged: every Q8_0 matrix
    (Phi-3's fused qkv and gate_up, StarCoder2's biased MLP, the tied embedding / LM head) stays in its blocks, and
    the tokens and logprobs are those of the same file dequantized at load."""
    model = _kept_equals_dequantized(tmp_path, family)
    assert getattr(model, "model", model).embed_tokens.weight.dtype == torch.uint8
    linears = [m for m in model.modules() if getattr(m, "quant_method", None) is not None]
    assert len(linears) == 4 * 2 and all(m.weight.dtype == torch.uint8 for m in linears)


def _kept_equals_dequantized(tmp_path, family: str, ggml_type: str = "Q8_0", wider: dict | None = None,
                             prepare: Callable[[torch.nn.Module], None] | None = None) -> torch.nn.Module:  # fmt: skip
    """The family's file of ``ggml_type`` matrices (``wider``: config overrides) with ``--quantization gguf`` gives
    the tokens and first logprobs of the same file dequantized at load; ``prepare`` changes the kept model before it
    runs. Returns the kept model."""
    arch, gguf_arch, overrides = FAMILIES[family]
    path = tmp_path / f"{family}-{ggml_type}.gguf"
    write_family_gguf(path, gguf_arch, _tiny_hf_model(arch, overrides | (wider or {})),
                      gguf.GGMLQuantizationType[ggml_type])  # fmt: skip
    prompts = random_prompts(5, lengths=(3, 17))
    runs = []
    for quantization in ("gguf", None):
        engine = make_engine(path, dtype="float32", quantization=quantization)
        if quantization and prepare is not None:
            prepare(engine.runner.model)
        runs.append((engine, run_engine(engine, prompts, GREEDY)))
    (kept, ours), (_, reference) = runs
    for key, expected in reference.items():
        assert ours[key]["tokens"] == expected["tokens"]
        for token, logprob in expected["logprobs"][0].items():
            assert ours[key]["logprobs"][0][token] == pytest.approx(logprob, abs=1e-4)
    return kept.runner.model


@pytest.mark.parametrize("family", ["falcon_40b_style", "falcon_7b_style", "gpt_neox", "gpt2"])
def test_families_whose_weights_llama_cpp_reorders_keep_blocks(tmp_path, family):
    """Falcon's and GPT-NeoX's fused qkv rows, which llama.cpp reorders, and GPT-2's Conv1D weights, which it stores
    transposed as linear weights: their Q8_0 blocks kept, the qkv block rows regrouped as the file's float rows
    are, the Conv1D blocks left as linear rows; the embeddings and own LM heads dequantized: the tokens and logprobs
    of the same file dequantized at load."""
    model = _kept_equals_dequantized(tmp_path, family)
    linears = [m for m in model.modules() if getattr(m, "quant_method", None) is not None]
    assert len(linears) == 4 * 2 and all(m.weight.dtype == torch.uint8 for m in linears)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_gguf_experts_kept_in_their_blocks_equal_them_dequantized(tmp_path, family):
    """``--quantization gguf`` on a mixture of experts: llama.cpp's stacked experts (Q8_0 here) stay in their
    blocks, ``[experts, rows, row_bytes]`` for the fused MoE kernel, beside the attention's kept blocks; the tokens and
    logprobs are those of the same file dequantized at load."""
    blocks = [m for m in _kept_equals_dequantized(tmp_path, family).modules() if hasattr(m, "w13")]
    assert blocks and all(b.w13.dtype == torch.uint8 and b.w13.dim() == 3 for b in blocks)
    assert all(b.w2.shape[:2] == (b.num_experts, b.hidden) for b in blocks)


def _repack_as_cuda_does(model: torch.nn.Module) -> None:
    """What loading does on CUDA (CPU keeps the blocks: both forms dequantize in torch): every expert stack and
    dense projection of Q4_0 / Q4_1 / Q4_K repacked for the int4 kernels."""
    from core.layers.quantization.gguf import GGUFLinearMethod, GGUFMoEMethod, repack_experts, repack_for_int4_kernels

    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, GGUFMoEMethod):
            assert method.experts(module)[2].gguf  # as loaded on CPU
            assert repack_experts(module, method.types) == ("int4", "int4")
        elif isinstance(method, GGUFLinearMethod):
            assert repack_for_int4_kernels(module, method.ggml_type)


@pytest.mark.parametrize("family, ggml_type", [("qwen2_moe", "Q4_K"), ("qwen3_moe", "Q4_K"), ("qwen3_moe", "Q4_0")])
def test_moe_gguf_q4_experts_on_the_int4_experts_kernel_equal_them_dequantized(tmp_path, family, ggml_type):
    """A Q4_K (Q4_K_M's gate / up) or Q4_0 file's expert stacks repacked as on CUDA for the int4 experts' kernel
    (codes, scales and offsets in groups of 32: ``ExpertQuant`` int4, no GGUF blocks left) and its dense projections
    for the int4 kernels: the tokens and logprobs of the same file dequantized at load (K-quants: models 256 wide)."""
    wider = {"hidden_size": 256, "moe_intermediate_size": 256} if ggml_type == "Q4_K" else None
    model = _kept_equals_dequantized(tmp_path, family, ggml_type, wider, prepare=_repack_as_cuda_does)
    blocks = [m for m in model.modules() if hasattr(m, "w13")]
    assert blocks
    for block in blocks:
        _, _, quant = block.quant_method.experts(block)
        assert quant.int4 and not quant.gguf and quant.w13_group == quant.w2_group == 32
        assert quant.w13_offsets.shape == (block.num_experts, block.hidden // 32, 2 * block.inter)
        assert block.w2.dtype == torch.int32 and block.w2.shape == (block.num_experts, block.hidden, block.inter // 8)
    qkv = next(m for m in model.modules() if hasattr(m, "qkv_proj")).qkv_proj
    assert qkv.ggml_type == int(gguf.GGMLQuantizationType[ggml_type]) and qkv.qweight.dtype == torch.int32


def _repack_experts_as_int8_as_cuda_does(model: torch.nn.Module) -> None:
    """What loading does on CUDA to Q8_0 / Q6_K expert stacks: repacked for the 8-bit experts' kernel (the dense
    projections of those types stay in their blocks)."""
    from core.layers.quantization.gguf import GGUFMoEMethod, repack_experts

    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, GGUFMoEMethod):
            assert method.experts(module)[2].gguf  # as loaded on CPU
            assert repack_experts(module, method.types) == ("int8", "int8")


@pytest.mark.parametrize("family, ggml_type", [("qwen3_moe", "Q8_0"), ("qwen3_moe", "Q6_K"), ("qwen2_moe", "Q6_K")])
def test_moe_gguf_8bit_experts_on_the_int8_experts_kernel_equal_them_dequantized(tmp_path, family, ggml_type):
    """A Q8_0 or Q6_K (Q4_K_M's down) file's expert stacks repacked as on CUDA for the 8-bit experts' kernel (int8
    codes ``[E, N, K]``, fp32 scales per 32 / 16 inputs: ``ExpertQuant`` int8, no GGUF blocks left): the tokens and
    logprobs of the same file dequantized at load (K-quants: models 256 wide)."""
    wider = {"hidden_size": 256, "moe_intermediate_size": 256} if ggml_type == "Q6_K" else None
    model = _kept_equals_dequantized(tmp_path, family, ggml_type, wider, prepare=_repack_experts_as_int8_as_cuda_does)
    blocks = [m for m in model.modules() if hasattr(m, "w13")]
    assert blocks
    group = 16 if ggml_type == "Q6_K" else 32
    for block in blocks:
        _, _, quant = block.quant_method.experts(block)
        assert quant.w13_int8 and quant.w2_int8 and not quant.gguf and not quant.int4
        assert quant.w13_group == quant.w2_group == group and quant.w13_offsets is None
        assert block.w2.dtype == torch.int8 and block.w2.shape == (block.num_experts, block.hidden, block.inter)
        assert block.w13_scale.shape == (block.num_experts, block.hidden // group, 2 * block.inter)


@pytest.mark.parametrize("family, ggml_type", [("qwen3", "IQ4_NL"), ("mistral_sw", "IQ4_XS"), ("qwen3_moe", "IQ4_NL"),
                                               ("qwen2_moe", "IQ4_XS")])  # fmt: skip
def test_iq4_gguf_runs_on_the_codebook_kernels_as_dequantized(tmp_path, family, ggml_type):
    """IQ4_NL / IQ4_XS files (llama.cpp's non-linear 4-bit types): their linear layers and expert stacks repacked
    for the 4-bit codebook kernels on any device (``kvalues_iq4nl`` as the codebook, each block of 32's scale), the
    embedding dequantized: the tokens and logprobs of the same file dequantized at load (IQ4_XS: models 256 wide)."""
    wider = {"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 256} if ggml_type == "IQ4_XS" \
        else None  # fmt: skip
    model = _kept_equals_dequantized(tmp_path, family, ggml_type, wider)
    qkv = next(m for m in model.modules() if hasattr(m, "qkv_proj")).qkv_proj
    assert qkv.weight_absmax.shape == (qkv.out_features, qkv.in_features // 32) and qkv.weight_quant_map[0] == -127
    for block in (m for m in model.modules() if hasattr(m, "w13")):
        _, _, quant = block.quant_method.experts(block)
        assert quant.bnb_block == 32 and quant.w13_scale.shape[-1] == block.hidden // 32


def _metadata_only_gguf(path, arch: str, layers: int, **keys) -> dict:
    from core.gguf import GGUFFile, hf_config_from_gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(3584)
    writer.add_head_count(16)
    writer.add_head_count_kv(8)
    writer.add_key_length(128)
    writer.add_feed_forward_length(64)
    writer.add_sliding_window(4096)
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf_config_from_gguf(GGUFFile(path))


def test_gemma_query_scale_and_layer_pattern_follow_llama_cpp(tmp_path):
    """What a Gemma GGUF cannot say is what llama.cpp assumes: queries scaled by head_dim except the 27B models
    (hidden / heads), ``attention.scale`` when stored; Gemma 3 global every 6th layer unless a pattern is stored."""
    assert _metadata_only_gguf(tmp_path / "a.gguf", "gemma2", 42)["query_pre_attn_scalar"] == 128
    assert _metadata_only_gguf(tmp_path / "b.gguf", "gemma2", 46)["query_pre_attn_scalar"] == 3584 // 16
    scaled = _metadata_only_gguf(tmp_path / "c.gguf", "gemma3", 2, attention_scale=1 / 12)
    assert scaled["query_pre_attn_scalar"] == 144
    default = _metadata_only_gguf(tmp_path / "d.gguf", "gemma3", 12)
    assert [i for i, t in enumerate(default["layer_types"]) if t == "full_attention"] == [5, 11]
    flags = _metadata_only_gguf(tmp_path / "e.gguf", "gemma3", 3, sliding_window_pattern=[True, False, True])
    assert flags["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    g2 = _metadata_only_gguf(tmp_path / "f.gguf", "gemma2", 4)
    assert g2["layer_types"] == ["sliding_attention", "full_attention"] * 2 and g2["sliding_window"] == 4096


@pytest.mark.gpu
@pytest.mark.parametrize("family, ggml_type", [("qwen3_moe", "Q4_K"), ("qwen3_moe", "Q6_K"), ("qwen3", "IQ4_NL"),
                                               ("falcon_40b_style", "Q8_0")])  # fmt: skip
def test_gguf_kept_on_gpu_with_cuda_graphs(tmp_path, family, ggml_type):
    """On CUDA the loader repacks what it keeps (Q4_K experts and dense layers for the int4 kernels, Q6_K experts for
    the 8-bit experts', IQ4 for the codebook kernels; Falcon's Q8_0 blocks with their qkv rows regrouped) and the
    decode graphs run those kernels (bf16): the same tokens as eager decode, and first-step logprobs within bf16's
    own error of the same file dequantized at load in fp32."""
    arch, gguf_arch, overrides = FAMILIES[family]
    wider = {"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 256} \
        if ggml_type in ("Q4_K", "Q6_K") else {}  # fmt: skip
    path = tmp_path / f"{family}-{ggml_type}.gguf"
    write_family_gguf(path, gguf_arch, _tiny_hf_model(arch, overrides | wider), gguf.GGMLQuantizationType[ggml_type])
    engine, graphs = qc.greedy(path, quantization="gguf", dtype="bfloat16", device="cuda")
    assert engine.runner.use_graphs
    _, eager = qc.greedy(path, quantization="gguf", dtype="bfloat16", device="cuda", enforce_eager=True)
    assert [r["tokens"] for r in graphs] == [r["tokens"] for r in eager]
    qc.assert_within_bf16_error(graphs, path)  # the file without --quantization gguf: dequantized at load
