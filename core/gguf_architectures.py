"""Per-architecture GGUF <-> Hugging Face mapping for the model families beyond llama/qwen2/qwen3.

One :class:`GGUFArchitecture` per llama.cpp ``general.architecture``: how its metadata becomes the HF ``config.json``
the family's reader expects (core/models/), how its tensor names become HF names, and which of llama.cpp's
convert-time changes (convert_hf_to_gguf.py) to undo: Gemma's stored ``1 + w`` norms, Falcon's and GPT-NeoX's
reordered fused qkv, GPT-2's transposed Conv1D weights. What a GGUF cannot say (Gemma 2/3's
``query_pre_attn_scalar``, Gemma 3's local RoPE base and layer pattern) follows llama.cpp's own defaults, so a file
runs here as it runs in llama.cpp.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from core.gguf import GGUFFile


class Meta:
    """``{arch}.key`` lookups of one file's metadata, and the shapes every family's config needs."""

    def __init__(self, gguf: GGUFFile, arch: str):
        self.gguf, self.arch, self.tensors = gguf, arch, gguf.tensors

    def get(self, key: str, default: Any = None) -> Any:
        return self.gguf.metadata.get(f"{self.arch}.{key}", default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"GGUF file {self.gguf.path} lacks '{self.arch}.{key}'.")
        return value

    @property
    def num_heads(self) -> int:
        return int(self.require("attention.head_count"))

    @property
    def num_kv_heads(self) -> int:
        value = self.get("attention.head_count_kv", self.num_heads)
        return int(value.max()) if isinstance(value, np.ndarray) else int(value)

    @property
    def hidden_size(self) -> int:
        return int(self.require("embedding_length"))

    @property
    def num_layers(self) -> int:
        return int(self.require("block_count"))

    @property
    def head_dim(self) -> int:
        return int(self.get("attention.key_length") or self.hidden_size // self.num_heads)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def eps(self, key: str = "attention.layer_norm_rms_epsilon", default: float = 1e-6) -> float:
        from core.gguf import _float32_to_decimal

        return _float32_to_decimal(self.get(key, default))

    def decimal(self, key: str, default: float) -> float:
        """A float32 metadata value as the decimal it was written from."""
        from core.gguf import _float32_to_decimal

        return _float32_to_decimal(self.get(key, default))

    def sliding_window(self) -> int:
        return int(self.get("attention.sliding_window") or 0)


Transform = Callable[[str, np.ndarray, Meta], np.ndarray]


@dataclass(frozen=True)
class GGUFArchitecture:
    hf_architecture: str
    model_type: str
    config: Callable[[Meta], dict[str, Any]]  # family keys of the HF config (beside the common ones)
    global_names: dict[str, str]  # GGUF tensor name (no .weight/.bias) -> HF module path
    layer_prefix: str  # HF prefix of layer i's modules, "{i}" formatted in
    layer_names: dict[str, str]  # GGUF per-layer module (after blk.N.) -> HF module path inside the layer
    transform: Transform | None = None  # undo llama.cpp's convert-time change of a tensor
    consumed_by_config: frozenset[str] = field(default_factory=frozenset)  # tensors read into the config
    # its linear weights can stay in their GGML blocks: ``transform`` leaves them alone or only reorders their output
    # rows (Falcon's, GPT-NeoX's qkv), which it does to the blocks' rows as well (GPT-2's transpose skips them)
    keeps_blocks: bool = False

    def hf_name(self, gguf_name: str) -> str:
        module, _, kind = gguf_name.rpartition(".")
        if module in self.global_names:
            return f"{self.global_names[module]}.{kind}"
        match = _LAYER_RE.fullmatch(module)
        if match and match.group(2) in self.layer_names:
            return f"{self.layer_prefix.format(match.group(1))}.{self.layer_names[match.group(2)]}.{kind}"
        raise ValueError(f"GGUF tensor '{gguf_name}' has no counterpart in {self.hf_architecture}.")


_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


# -- undoing llama.cpp's convert-time changes --------------------------------------------------------------------


def _unshift_norms(name: str, array: np.ndarray, meta: Meta) -> np.ndarray:
    """Gemma: llama.cpp stores the ``1 + w`` its plain RMSNorm multiplies by; HF stores ``w``."""
    return array - 1.0 if name.endswith("norm.weight") else array


def _falcon_qkv(name: str, array: np.ndarray, meta: Meta) -> np.ndarray:
    """llama.cpp rewrites Falcon's grouped qkv (per KV head: its query heads, one k, one v) as q | k | v; regroup.
    With one KV head (Falcon-7B's multi-query) both layouts are q | k | v."""
    if ".attn_qkv." not in name:
        return array
    n_kv, head_dim = meta.num_kv_heads, meta.hidden_size // meta.num_heads
    group = meta.num_heads // n_kv
    rows = array.reshape(-1, head_dim, *array.shape[1:])  # [heads + 2 kv, head_dim, ...]
    q = rows[: n_kv * group].reshape(n_kv, group, head_dim, *array.shape[1:])
    k = rows[n_kv * group : n_kv * (group + 1)].reshape(n_kv, 1, head_dim, *array.shape[1:])
    v = rows[n_kv * (group + 1) :].reshape(n_kv, 1, head_dim, *array.shape[1:])
    return np.concatenate([q, k, v], axis=1).reshape(array.shape)


def _neox_qkv(name: str, array: np.ndarray, meta: Meta) -> np.ndarray:
    """llama.cpp rewrites GPT-NeoX's per-head interleaved qkv ([head][q|k|v]) as q | k | v; interleave again."""
    if ".attn_qkv." not in name:
        return array
    n_heads = meta.num_heads
    head_dim = array.shape[0] // 3 // n_heads
    split = array.reshape(3, n_heads, head_dim, *array.shape[1:])
    return split.swapaxes(0, 1).reshape(array.shape)


def _router_row(name: str, array: np.ndarray, meta: Meta) -> np.ndarray:
    """Qwen2-MoE's shared-expert gate is HF's ``[1, hidden]`` linear; llama.cpp stores it as ``[hidden]``."""
    return array.reshape(1, -1) if name.endswith(".ffn_gate_inp_shexp.weight") else array


_GPT2_CONV1D = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")


def _gpt2_conv1d(name: str, array: np.ndarray, meta: Meta) -> np.ndarray:
    """GPT-2's Conv1D weights are ``[in, out]``; llama.cpp stores them transposed as ordinary linear weights. Kept
    blocks (uint8 rows) stay so: their rows are the outputs, as a linear layer's (``GPT2LMHeadModel._place``)."""
    if not name.endswith(_GPT2_CONV1D) or array.dtype == np.uint8:
        return array
    return np.ascontiguousarray(array.T)


# -- configs ------------------------------------------------------------------------------------------------------


def _tied(meta: Meta) -> bool:
    """No ``output`` tensor, or one byte-equal to the embedding (GPT-2's converter writes the tied head out)."""
    if not meta.has("output.weight"):
        return True
    out, embd = meta.tensors["output.weight"], meta.tensors["token_embd.weight"]
    if out.ggml_type != embd.ggml_type or out.shape != embd.shape:
        return False
    return bool(np.array_equal(meta.gguf.raw("output.weight"), meta.gguf.raw("token_embd.weight")))


def _llama_style(meta: Meta) -> dict[str, Any]:
    """The HF keys of the Llama-like configs (Gemma, Phi-3, StarCoder2 read them under these names)."""
    return {
        "hidden_size": meta.hidden_size,
        "intermediate_size": int(meta.require("feed_forward_length")),
        "num_hidden_layers": meta.num_layers,
        "num_attention_heads": meta.num_heads,
        "num_key_value_heads": meta.num_kv_heads,
        "head_dim": meta.head_dim,
        "max_position_embeddings": int(meta.get("context_length", 2048)),
        "tie_word_embeddings": _tied(meta),
    }


def _gemma_query_scalar(meta: Meta, big_layers: int) -> float:
    """llama.cpp's attention scale: ``attention.scale`` if stored, else 1/sqrt(hidden/heads) for the 27B models
    (``big_layers`` layers) and 1/sqrt(head_dim) otherwise -- exactly HF's ``query_pre_attn_scalar`` of the releases."""
    scale = meta.get("attention.scale")
    if scale:
        return round(float(scale) ** -2, 4)
    if meta.num_layers == big_layers:
        return float(meta.hidden_size // meta.num_heads)
    return float(meta.head_dim)


def _gemma_config(meta: Meta) -> dict[str, Any]:
    return {**_llama_style(meta), "rms_norm_eps": meta.eps(), "rope_theta": meta.decimal("rope.freq_base", 10000.0),
            "hidden_activation": "gelu_pytorch_tanh"}  # fmt: skip


def _gemma2_config(meta: Meta) -> dict[str, Any]:
    window = meta.sliding_window()
    config = {
        **_gemma_config(meta),
        "attn_logit_softcapping": meta.get("attn_logit_softcapping"),
        "final_logit_softcapping": meta.get("final_logit_softcapping"),
        "query_pre_attn_scalar": _gemma_query_scalar(meta, big_layers=46),
    }
    if window:  # llama.cpp: even layers slide, odd layers are global
        config["sliding_window"] = window
        config["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                 for i in range(meta.num_layers)]  # fmt: skip
    return config


def _gemma3_layer_types(meta: Meta) -> list[str]:
    """``attention.sliding_window_pattern`` (a period, or one flag per layer) else llama.cpp's: 5 local, 1 global."""
    pattern = meta.get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, (np.ndarray, list)):
        sliding = [bool(x) for x in pattern]
    else:
        sliding = [(i + 1) % int(pattern) != 0 for i in range(meta.num_layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _gemma3_config(meta: Meta) -> dict[str, Any]:
    config = _gemma_config(meta)
    global_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": meta.decimal("rope.freq_base", 1000000.0)}
    if meta.get("rope.scaling.type") == "linear" and meta.get("rope.scaling.factor"):
        global_rope.update(rope_type="linear", factor=meta.decimal("rope.scaling.factor", 1.0))
    config.pop("rope_theta")
    config["rope_parameters"] = {
        "full_attention": global_rope,
        "sliding_attention": {"rope_type": "default", "rope_theta": meta.decimal("rope.freq_base_swa", 10000.0)},
    }
    config["query_pre_attn_scalar"] = _gemma_query_scalar(meta, big_layers=62)
    if meta.get("final_logit_softcapping"):
        config["final_logit_softcapping"] = meta.get("final_logit_softcapping")
    window = meta.sliding_window()
    if window:
        config["sliding_window"] = window
        config["layer_types"] = _gemma3_layer_types(meta)
    return config


def _phi3_config(meta: Meta) -> dict[str, Any]:
    config = {**_llama_style(meta), "rms_norm_eps": meta.eps(), "rope_theta": meta.decimal("rope.freq_base", 10000.0)}
    rotary_dims = int(meta.get("rope.dimension_count") or meta.head_dim)
    if rotary_dims != meta.head_dim:
        config["partial_rotary_factor"] = rotary_dims / meta.head_dim
    original = meta.get("rope.scaling.original_context_length")
    if original:
        config["original_max_position_embeddings"] = int(original)
    if meta.sliding_window():  # 0 marks Phi-4, which has none
        config["sliding_window"] = meta.sliding_window()
    if meta.has("rope_factors_long.weight"):
        if not original:
            raise ValueError(f"{meta.gguf.path}: longrope factors without rope.scaling.original_context_length.")
        config["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": [float(x) for x in meta.gguf.to_float32("rope_factors_long.weight")],
            "short_factor": [float(x) for x in meta.gguf.to_float32("rope_factors_short.weight")],
            "original_max_position_embeddings": int(original),
        }
        attn_factor = meta.get("rope.scaling.attn_factor")
        if attn_factor is not None:
            config["rope_scaling"]["attention_factor"] = float(attn_factor)
    return config


def _falcon_config(meta: Meta) -> dict[str, Any]:
    two_norms = meta.has("blk.0.attn_norm_2.weight")
    new_arch = two_norms or meta.num_kv_heads > 1  # Falcon-7B is multi-query with one norm; 40B/180B grouped
    return {
        "hidden_size": meta.hidden_size,
        "num_hidden_layers": meta.num_layers,
        "num_attention_heads": meta.num_heads,
        "num_kv_heads": meta.num_kv_heads,
        "new_decoder_architecture": new_arch,
        "num_ln_in_parallel_attn": 2 if two_norms else 1,
        "multi_query": meta.num_kv_heads == 1,
        "parallel_attn": True,  # llama.cpp's Falcon graph is always parallel
        "alibi": False,
        "bias": meta.has("blk.0.attn_qkv.bias"),
        "ffn_hidden_size": int(meta.get("feed_forward_length") or 4 * meta.hidden_size),
        "layer_norm_epsilon": meta.eps("attention.layer_norm_epsilon", 1e-5),
        "rope_theta": meta.decimal("rope.freq_base", 10000.0),
        "max_position_embeddings": int(meta.get("context_length", 2048)),
        "tie_word_embeddings": _tied(meta),
    }


def _gptneox_config(meta: Meta) -> dict[str, Any]:
    head_dim = meta.hidden_size // meta.num_heads
    return {
        "hidden_size": meta.hidden_size,
        "intermediate_size": int(meta.get("feed_forward_length") or 4 * meta.hidden_size),
        "num_hidden_layers": meta.num_layers,
        "num_attention_heads": meta.num_heads,
        "rotary_pct": int(meta.get("rope.dimension_count") or head_dim) / head_dim,
        "rotary_emb_base": meta.decimal("rope.freq_base", 10000.0),
        "layer_norm_eps": meta.eps("attention.layer_norm_epsilon", 1e-5),
        "use_parallel_residual": bool(meta.get("use_parallel_residual", True)),
        "attention_bias": meta.has("blk.0.attn_qkv.bias"),
        "hidden_act": "gelu",
        "max_position_embeddings": int(meta.get("context_length", 2048)),
        "tie_word_embeddings": _tied(meta),
    }


def _gpt2_config(meta: Meta) -> dict[str, Any]:
    return {
        "n_embd": meta.hidden_size,
        "n_layer": meta.num_layers,
        "n_head": meta.num_heads,
        "n_positions": int(meta.get("context_length") or meta.tensors["position_embd.weight"].shape[0]),
        "n_inner": int(meta.get("feed_forward_length") or 4 * meta.hidden_size),
        "layer_norm_epsilon": meta.eps("attention.layer_norm_epsilon", 1e-5),
        "activation_function": "gelu_new",
        "tie_word_embeddings": _tied(meta),
    }


def _starcoder2_config(meta: Meta) -> dict[str, Any]:
    config = {**_llama_style(meta), "norm_epsilon": meta.eps("attention.layer_norm_epsilon", 1e-5),
              "rope_theta": meta.decimal("rope.freq_base", 10000.0), "use_bias": meta.has("blk.0.attn_q.bias"),
              "hidden_act": "gelu_pytorch_tanh"}  # fmt: skip
    if meta.sliding_window():
        config["sliding_window"] = meta.sliding_window()
    return config


def _qwen_moe_config(meta: Meta) -> dict[str, Any]:
    """Qwen2-MoE / Qwen3-MoE. llama.cpp runs every layer that has a router as sparse and the rest dense, and
    renormalises the top-k weights for qwen3moe only (``expert_weights_norm`` where a file says it)."""
    from core.gguf import _rope_scaling

    moe_size = int(meta.require("expert_feed_forward_length"))
    head_dim = int(meta.get("attention.key_length") or meta.tensors["blk.0.attn_q.weight"].shape[0] // meta.num_heads)
    config = {
        **_llama_style(meta),
        "intermediate_size": int(meta.get("feed_forward_length") or moe_size),  # the dense layers' MLP
        "head_dim": head_dim,
        "rms_norm_eps": meta.eps(),
        "rope_theta": meta.decimal("rope.freq_base", 1000000.0),
        "hidden_act": "silu",
        "num_experts": int(meta.require("expert_count")),
        "num_experts_per_tok": int(meta.require("expert_used_count")),
        "moe_intermediate_size": moe_size,
        "norm_topk_prob": bool(meta.get("expert_weights_norm", meta.arch == "qwen3moe")),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(meta.num_layers) if not meta.has(f"blk.{i}.ffn_gate_inp.weight")],
    }
    scaling = _rope_scaling(meta.gguf, meta.arch, head_dim)
    if scaling is not None:
        config["rope_scaling"] = scaling
    if meta.arch == "qwen2moe":
        config["qkv_bias"] = meta.has("blk.0.attn_q.bias")
        config["shared_expert_intermediate_size"] = int(meta.get("expert_shared_feed_forward_length") or 0)
    return config


# -- the table ----------------------------------------------------------------------------------------------------

_HF_LLAMA_GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_HF_LLAMA_ATTENTION = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                       "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                       "attn_k_norm": "self_attn.k_norm"}  # fmt: skip
_HF_GATED_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_HF_MOE = {"ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
           "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
           "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}  # fmt: skip
_GEMMA2_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}  # fmt: skip

ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "gemma": GGUFArchitecture(
        "GemmaForCausalLM", "gemma", _gemma_config, _HF_LLAMA_GLOBALS, "model.layers.{}",
        {**_HF_LLAMA_ATTENTION, **_HF_GATED_MLP, "attn_norm": "input_layernorm",
         "ffn_norm": "post_attention_layernorm"},
        _unshift_norms, keeps_blocks=True,
    ),
    "gemma2": GGUFArchitecture(
        "Gemma2ForCausalLM", "gemma2", _gemma2_config, _HF_LLAMA_GLOBALS, "model.layers.{}",
        {**_HF_LLAMA_ATTENTION, **_HF_GATED_MLP, **_GEMMA2_NORMS}, _unshift_norms, keeps_blocks=True,
    ),
    "gemma3": GGUFArchitecture(
        "Gemma3ForCausalLM", "gemma3_text", _gemma3_config, _HF_LLAMA_GLOBALS, "model.layers.{}",
        {**_HF_LLAMA_ATTENTION, **_HF_GATED_MLP, **_GEMMA2_NORMS}, _unshift_norms, keeps_blocks=True,
    ),
    "phi3": GGUFArchitecture(
        "Phi3ForCausalLM", "phi3", _phi3_config, _HF_LLAMA_GLOBALS, "model.layers.{}",
        {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
        consumed_by_config=frozenset({"rope_factors_long.weight", "rope_factors_short.weight"}), keeps_blocks=True,
    ),
    "falcon": GGUFArchitecture(
        "FalconForCausalLM", "falcon", _falcon_config,
        {"token_embd": "transformer.word_embeddings", "output_norm": "transformer.ln_f", "output": "lm_head"},
        "transformer.h.{}",
        {"attn_qkv": "self_attention.query_key_value", "attn_output": "self_attention.dense",
         "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h", "attn_norm": "input_layernorm",
         "attn_norm_2": "ln_attn"},
        _falcon_qkv, keeps_blocks=True,
    ),
    "gptneox": GGUFArchitecture(
        "GPTNeoXForCausalLM", "gpt_neox", _gptneox_config,
        {"token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm", "output": "embed_out"},
        "gpt_neox.layers.{}",
        {"attn_qkv": "attention.query_key_value", "attn_output": "attention.dense", "ffn_up": "mlp.dense_h_to_4h",
         "ffn_down": "mlp.dense_4h_to_h", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
        _neox_qkv, keeps_blocks=True,
    ),
    "gpt2": GGUFArchitecture(
        "GPT2LMHeadModel", "gpt2", _gpt2_config,
        {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
         "output": "lm_head"},
        "transformer.h.{}",
        {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
         "attn_norm": "ln_1", "ffn_norm": "ln_2"},
        _gpt2_conv1d, keeps_blocks=True,
    ),
    **{arch: GGUFArchitecture(
        f"{family}ForCausalLM", model_type, _qwen_moe_config, _HF_LLAMA_GLOBALS, "model.layers.{}",
        {**_HF_LLAMA_ATTENTION, **_HF_GATED_MLP, **_HF_MOE, "attn_norm": "input_layernorm",
         "ffn_norm": "post_attention_layernorm"}, _router_row, keeps_blocks=True,
    ) for arch, family, model_type in (("qwen2moe", "Qwen2Moe", "qwen2_moe"), ("qwen3moe", "Qwen3Moe", "qwen3_moe"))},
    "starcoder2": GGUFArchitecture(
        "Starcoder2ForCausalLM", "starcoder2", _starcoder2_config, _HF_LLAMA_GLOBALS, "model.layers.{}",
        {**_HF_LLAMA_ATTENTION, "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj", "attn_norm": "input_layernorm",
         "ffn_norm": "post_attention_layernorm"}, keeps_blocks=True,
    ),
}


def hf_config(gguf: GGUFFile, arch: str) -> dict[str, Any]:
    """The family's HF config keys of a file of ``arch`` (one of :data:`ARCHITECTURES`)."""
    spec = ARCHITECTURES[arch]
    meta = Meta(gguf, arch)
    config = {"architectures": [spec.hf_architecture], "model_type": spec.model_type,
              "vocab_size": int(gguf.tensors["token_embd.weight"].shape[0]), **spec.config(meta)}  # fmt: skip
    return config


def hf_tensor_name(gguf: GGUFFile, arch: str, gguf_name: str) -> str:
    name = ARCHITECTURES[arch].hf_name(gguf_name)
    if arch == "falcon" and "blk.0.attn_norm_2.weight" in gguf.tensors:
        # Falcon-40B's two norms: llama.cpp's attn_norm_2 normalizes for attention (ln_attn), attn_norm for the MLP
        name = name.replace(".input_layernorm.", ".ln_mlp.")
    return name


def convert_tensor(gguf: GGUFFile, arch: str, gguf_name: str, array: np.ndarray) -> np.ndarray:
    spec = ARCHITECTURES[arch]
    return spec.transform(gguf_name, array, Meta(gguf, arch)) if spec.transform else array
