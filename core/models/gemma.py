"""Gemma (1): GeGLU MLP, embeddings scaled by sqrt(hidden), (1 + w) RMSNorm, tied head. The decoder here also carries
what Gemma 2 and Gemma 3 add (core/models/gemma2.py, gemma3.py read their configs into :class:`GemmaConfig`):
post-attention / pre- and post-feedforward norms, attention and final logit soft-capping, ``query_pre_attn_scalar``,
per-layer sliding windows with their own RoPE base, and q/k norm.

The (1 + w) of Gemma's norms is folded into the stored weight at load, so the ordinary RMSNorm kernels (and the fused
q/k norm of attention_prep) run them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.config import ModelConfig, common_fields
from core.layers.activation import activation, gated
from core.layers.attention import AttentionMetadata
from core.layers.linear import Linear, head_logits, lm_head, token_embedding
from core.layers.norm import RMSNorm
from core.layers.quantization import linear_method
from core.layers.rotary import RotaryEmbedding
from core.models import weights as weight_utils
from core.models.llama import Attention
from kernels.backend import resolve_backends

# Weight quantization methods the family's projections run (core/layers/quantization); with gguf the embedding (and
# tied LM head) may stay in its blocks too.
SUPPORTED_QUANTIZATION = ("fp8", "awq", "gptq", "gguf", "bitsandbytes", "nvfp4")


@dataclass(frozen=True)
class GemmaConfig(ModelConfig):
    hidden_activation: str = "gelu_pytorch_tanh"
    sandwich_norms: bool = False  # Gemma 2/3: post-attention, pre- and post-feedforward norms
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    query_pre_attn_scalar: float = 0.0  # 0: scale by head_dim ** -0.5
    local_rope_theta: float = 0.0  # Gemma 3: RoPE base of the sliding layers (0: the global one)


def gemma_fields(d: dict[str, Any], architecture: str) -> dict[str, Any]:
    fields = common_fields(d, architecture)
    fields["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", True))
    fields["hidden_activation"] = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if fields["hidden_activation"] == "gelu":  # HF Gemma 1 configs say gelu and HF runs the tanh approximation
        fields["hidden_activation"] = "gelu_pytorch_tanh"
    return fields


def read_config(d: dict[str, Any], architecture: str) -> GemmaConfig:
    return GemmaConfig(**gemma_fields(d, architecture))


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig, kernel_backend: str, prefix: str = "") -> None:
        """``prefix``: the HF module name (``model.layers.0.mlp``), for the quantization config's choices."""
        super().__init__()
        activation(cfg.hidden_activation)  # unknown names fail here, at build time
        self.act_name, self.kernel_backend = cfg.hidden_activation, kernel_backend
        inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * inter, backend=kernel_backend, output_sizes=(inter, inter),
                                   quant_method=linear_method(cfg.quantization, f"{prefix}.gate_proj"))
        self.down_proj = Linear(inter, cfg.hidden_size, backend=kernel_backend,
                                quant_method=linear_method(cfg.quantization, f"{prefix}.down_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated(self.gate_up_proj(x), self.act_name, self.kernel_backend))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, rotary: RotaryEmbedding, layer: int, attention_backend: str,
                 kernel_backend: str) -> None:  # fmt: skip
        super().__init__()
        self.sandwich = cfg.sandwich_norms
        scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else None
        self.self_attn = Attention(cfg, rotary, attention_backend, kernel_backend, cfg.layer_window(layer), scale,
                                   cfg.attn_softcap, prefix=f"model.layers.{layer}.self_attn")
        self.mlp = GemmaMLP(cfg, kernel_backend, prefix=f"model.layers.{layer}.mlp")
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, backend=kernel_backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, backend=kernel_backend)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, backend=kernel_backend)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, backend=kernel_backend)

    def forward(self, positions, hidden, residual, kv_cache, meta):
        """``hidden + residual`` is the residual stream (the add is fused into the next norm)."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        if not self.sandwich:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return self.mlp(hidden), residual
        hidden = self.post_attention_layernorm(hidden)
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    def __init__(self, cfg: GemmaConfig, attention_backend: str, kernel_backend: str) -> None:
        super().__init__()
        self.embed_tokens = token_embedding(cfg, kernel_backend)
        self.normalizer = math.sqrt(cfg.hidden_size)
        global_rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        local_rotary = global_rotary
        if cfg.local_rope_theta:
            local_rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.local_rope_theta, None)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(cfg, local_rotary if cfg.layer_window(i) else global_rotary, i, attention_backend,
                              kernel_backend)
            for i in range(cfg.num_layers)
        )  # fmt: skip
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend=kernel_backend)

    def forward(self, input_ids, positions, kv_caches, meta):
        hidden = self.embed_tokens(input_ids)
        # HF multiplies by the normalizer rounded to the model dtype
        hidden = hidden * torch.tensor(self.normalizer, dtype=hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class GemmaForCausalLM(nn.Module):
    def __init__(self, cfg: GemmaConfig, *, attention_backend: str = "auto", kernel_backend: str = "auto") -> None:
        super().__init__()
        self.config = cfg
        self.attention_backend, self.kernel_backend = resolve_backends(attention_backend, kernel_backend)
        self.model = GemmaModel(cfg, self.attention_backend, self.kernel_backend)
        self.lm_head = lm_head(cfg, self.model.embed_tokens, self.kernel_backend)

    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = head_logits(self.lm_head, hidden, self.kernel_backend)
        cap = self.config.final_softcap
        # in place on the fresh float32 logits: no [rows, vocab] temporaries (256k vocab: 1 MB a row each)
        return logits.div_(cap).tanh_().mul_(cap) if cap > 0 else logits

    def _place(self, name: str, tensor: torch.Tensor):
        cfg = self.config
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            return []
        if name.endswith("norm.weight"):  # (1 + w) folded into the weight
            return [(name, None, tensor.float() + 1.0)]
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        slices = {"self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", q),
                  "self_attn.v_proj": ("self_attn.qkv_proj", q + kv), "mlp.gate_proj": ("mlp.gate_up_proj", 0),
                  "mlp.up_proj": ("mlp.gate_up_proj", inter)}  # fmt: skip
        for hf, (ours, offset) in slices.items():
            if f".{hf}." in name:
                return [(name.replace(f".{hf}.", f".{ours}."), offset, tensor)]
        return [(name, None, tensor)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return weight_utils.load_weights(self, weights, self._place, self.config.architecture)

    def init_dummy_weights(self, seed: int = 0) -> None:
        weight_utils.init_dummy_weights(self, seed)
