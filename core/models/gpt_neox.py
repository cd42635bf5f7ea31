"""GPT-NeoX (Pythia): fused per-head-interleaved qkv with biases, partial rotary (``partial_rotary_factor``, applied
inside the fused prep kernel), LayerNorm with bias, GELU MLP, parallel (or sequential) residual, untied
``embed_out``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from core.config import ModelConfig, common_fields
from core.layers.activation import activation
from core.layers.attention import AttentionMetadata, PagedAttention
from core.layers.linear import Embedding, Linear
from core.layers.norm import LayerNorm
from core.layers.quantization import linear_method
from core.layers.rotary import RotaryEmbedding
from core.models import weights as weight_utils
from kernels.backend import resolve_backends
from kernels.skinny_gemm import linear as skinny_linear


# Weight quantization methods this family's layers run (core/layers/quantization): its fused qkv is one tensor in
# the checkpoint's own layout, so quantized checkpoints load as they are; a GGUF file's reordered qkv rows are
# interleaved again, blocks and all (core/gguf_architectures.py).
SUPPORTED_QUANTIZATION = ("fp8", "awq", "gptq", "bitsandbytes", "nvfp4", "gguf")


def read_config(d: dict[str, Any], architecture: str) -> ModelConfig:
    fields = common_fields(d, architecture)
    rope = d.get("rope_parameters") or {}
    factor = d.get("rotary_pct", d.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.25)))
    fields["rope_theta"] = float(d.get("rotary_emb_base", fields["rope_theta"]))
    if fields["rope_scaling"] is not None:
        fields["rope_scaling"] = {k: v for k, v in fields["rope_scaling"].items() if k != "partial_rotary_factor"}
    fields["rms_norm_eps"] = d.get("layer_norm_eps", 1e-5)
    fields["qkv_bias"] = bool(d.get("attention_bias", True))
    extra = {"rotary_dim": int(fields["head_dim"] * factor), "hidden_act": d.get("hidden_act", "gelu"),
             "parallel_residual": bool(d.get("use_parallel_residual", True))}  # fmt: skip
    return ModelConfig(**fields, extra=extra)


class GPTNeoXLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, attention_backend: str, kernel_backend: str,
                 prefix: str = "") -> None:  # fmt: skip
        """``prefix``: the HF module name (``gpt_neox.layers.0``), for the quantization config's per-layer choices."""
        super().__init__()
        quant = cfg.quantization
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.parallel = cfg.extra["parallel_residual"]
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.query_key_value = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias, backend=kernel_backend,
                                      quant_method=linear_method(quant, f"{prefix}.attention.query_key_value"))
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias, backend=kernel_backend,
                            quant_method=linear_method(quant, f"{prefix}.attention.dense"))
        self.attn = PagedAttention(cfg.num_heads, cfg.num_heads, cfg.head_dim, rotary,
                                   attention_backend=attention_backend, kernel_backend=kernel_backend)  # fmt: skip
        self.dense_h_to_4h = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, backend=kernel_backend,
                                    quant_method=linear_method(quant, f"{prefix}.mlp.dense_h_to_4h"))
        self.dense_4h_to_h = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, backend=kernel_backend,
                                    quant_method=linear_method(quant, f"{prefix}.mlp.dense_4h_to_h"))
        self.act = activation(cfg.extra["hidden_act"])

    def _attention(self, positions, x, kv_cache, meta):
        qkv = self.query_key_value(x).view(-1, self.num_heads, 3, self.head_dim)  # per head: q | k | v
        return self.dense(self.attn(positions, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], kv_cache, meta))

    def forward(self, positions, hidden, kv_cache, meta):
        attn = self._attention(positions, self.input_layernorm(hidden), kv_cache, meta)
        if self.parallel:
            mlp = self.dense_4h_to_h(self.act(self.dense_h_to_4h(self.post_attention_layernorm(hidden))))
            return hidden + attn + mlp
        hidden = hidden + attn
        return hidden + self.dense_4h_to_h(self.act(self.dense_h_to_4h(self.post_attention_layernorm(hidden))))


class GPTNeoXForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, *, attention_backend: str = "auto", kernel_backend: str = "auto") -> None:
        super().__init__()
        self.config = cfg
        self.attention_backend, self.kernel_backend = resolve_backends(attention_backend, kernel_backend)
        rotary = RotaryEmbedding(cfg.extra["rotary_dim"], cfg.max_position_embeddings, cfg.rope_theta,
                                 cfg.rope_scaling)  # fmt: skip
        self.embed_in = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(cfg, rotary, self.attention_backend, self.kernel_backend,
                                                 f"gpt_neox.layers.{i}") for i in range(cfg.num_layers))  # fmt: skip
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embed_out = (self.embed_in if cfg.tie_word_embeddings
                          else Linear(cfg.hidden_size, cfg.vocab_size, backend=self.kernel_backend))  # fmt: skip

    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_in(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(positions, hidden, kv_cache, meta)
        return self.final_layer_norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return skinny_linear(hidden, self.embed_out.weight, out_dtype=torch.float32, backend=self.kernel_backend)

    def _place(self, name: str, tensor: torch.Tensor):
        if name.endswith(("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")):
            return []  # old checkpoints' causal-mask buffers
        if name == "lm_head.weight":  # transformers 5's in-memory name of the head (its files say embed_out)
            name = "embed_out.weight"
        if name == "embed_out.weight" and self.config.tie_word_embeddings:
            return []
        name = name.removeprefix("gpt_neox.").replace(".attention.", ".").replace(".mlp.", ".")
        return [(name, None, tensor)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return weight_utils.load_weights(self, weights, self._place, self.config.architecture)

    def init_dummy_weights(self, seed: int = 0) -> None:
        weight_utils.init_dummy_weights(self, seed)
