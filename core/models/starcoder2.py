"""StarCoder2: Llama-shaped attention with biases everywhere, LayerNorm (with bias), a plain GELU MLP (c_fc -> c_proj)
and a sliding window on every layer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from core.config import ModelConfig, common_fields
from core.layers.activation import activation
from core.layers.attention import AttentionMetadata, PagedAttention
from core.layers.linear import Linear, head_logits, lm_head, token_embedding
from core.layers.norm import LayerNorm
from core.layers.quantization import linear_method
from core.layers.rotary import RotaryEmbedding
from core.models import weights as weight_utils
from kernels.backend import resolve_backends

# Weight quantization methods the family's projections run (core/layers/quantization); with gguf the embedding and
# LM head may stay in their blocks too.
SUPPORTED_QUANTIZATION = ("fp8", "awq", "gptq", "gguf", "bitsandbytes", "nvfp4")


def read_config(d: dict[str, Any], architecture: str) -> ModelConfig:
    fields = common_fields(d, architecture)
    fields["rms_norm_eps"] = d.get("norm_epsilon", 1e-5)  # LayerNorm's eps
    fields["qkv_bias"] = bool(d.get("use_bias", True))
    fields["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", True))
    return ModelConfig(**fields, extra={"hidden_act": d.get("hidden_act", "gelu_pytorch_tanh")})


class Starcoder2Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, layer: int, attention_backend: str,
                 kernel_backend: str) -> None:  # fmt: skip
        super().__init__()
        bias = cfg.qkv_bias
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        prefix = f"model.layers.{layer}"  # the HF module names, for the quantization config's choices
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=bias, backend=kernel_backend,
                               output_sizes=(self.q_size, self.kv_size, self.kv_size),
                               quant_method=linear_method(cfg.quantization, f"{prefix}.self_attn.q_proj"))
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=bias, backend=kernel_backend,
                             quant_method=linear_method(cfg.quantization, f"{prefix}.self_attn.o_proj"))
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rotary,
                                   attention_backend=attention_backend, kernel_backend=kernel_backend,
                                   sliding_window=cfg.layer_window(layer))  # fmt: skip
        self.c_fc = Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias, backend=kernel_backend,
                           quant_method=linear_method(cfg.quantization, f"{prefix}.mlp.c_fc"))
        self.c_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias, backend=kernel_backend,
                             quant_method=linear_method(cfg.quantization, f"{prefix}.mlp.c_proj"))
        self.act = activation(cfg.extra["hidden_act"])
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, kv_cache, meta):
        q, k, v = self.qkv_proj(self.input_layernorm(hidden)).split([self.q_size, self.kv_size, self.kv_size], -1)
        attn = self.attn(positions, q.reshape(-1, self.num_heads, self.head_dim),
                         k.reshape(-1, self.num_kv_heads, self.head_dim),
                         v.reshape(-1, self.num_kv_heads, self.head_dim), kv_cache, meta)  # fmt: skip
        hidden = hidden + self.o_proj(attn)
        return hidden + self.c_proj(self.act(self.c_fc(self.post_attention_layernorm(hidden))))


class Starcoder2ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, *, attention_backend: str = "auto", kernel_backend: str = "auto") -> None:
        super().__init__()
        self.config = cfg
        self.attention_backend, self.kernel_backend = resolve_backends(attention_backend, kernel_backend)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = token_embedding(cfg, self.kernel_backend)
        self.layers = nn.ModuleList(Starcoder2Layer(cfg, rotary, i, self.attention_backend, self.kernel_backend)
                                    for i in range(cfg.num_layers))  # fmt: skip
        self.norm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = lm_head(cfg, self.embed_tokens, self.kernel_backend)

    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(positions, hidden, kv_cache, meta)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(self.lm_head, hidden, self.kernel_backend)

    def _place(self, name: str, tensor: torch.Tensor):
        cfg = self.config
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            return []
        name = name.removeprefix("model.")
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        for hf, offset in (("q_proj", 0), ("k_proj", q), ("v_proj", q + kv)):
            if f".self_attn.{hf}." in name:
                return [(name.replace(f".self_attn.{hf}.", ".qkv_proj."), offset, tensor)]
        return [(weight_utils.rename({"self_attn.o_proj": "o_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "c_proj"},
                                     name), None, tensor)]  # fmt: skip

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return weight_utils.load_weights(self, weights, self._place, self.config.architecture)

    def init_dummy_weights(self, seed: int = 0) -> None:
        weight_utils.init_dummy_weights(self, seed)
