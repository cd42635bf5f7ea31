"""Falcon: fused qkv in three layouts (per-head interleaved; multi-query; the new decoder architecture's grouped
q..q,k,v per KV head) reordered at load into q | k | v, parallel attention + MLP (one or two input LayerNorms) or
sequential, LayerNorm with bias, GELU MLP, rotary or ALiBi (``alibi: true``), tied head."""

from __future__ import annotations

import math
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

# Weight quantization methods this family's layers run (core/layers/quantization): its fused qkv's output rows are
# reordered at load (per KV head -> q | k | v), each method's tensors where they hold them (``permute_outputs``).
# GGUF files' qkv rows (llama.cpp's q | k | v) are regrouped as the checkpoint's, blocks and all, then reordered so.
SUPPORTED_QUANTIZATION = ("fp8", "awq", "gptq", "bitsandbytes", "nvfp4", "gguf")


def read_config(d: dict[str, Any], architecture: str) -> ModelConfig:
    aliased = {**d, "num_attention_heads": d.get("num_attention_heads") or d["n_head"],
               "num_hidden_layers": d.get("num_hidden_layers") or d["n_layer"]}  # fmt: skip
    fields = common_fields(aliased, architecture)
    new_arch = bool(d.get("new_decoder_architecture", False))
    if new_arch:
        fields["num_kv_heads"] = int(d.get("num_kv_heads") or fields["num_heads"])
    elif d.get("multi_query", True):
        fields["num_kv_heads"] = 1
    else:
        fields["num_kv_heads"] = fields["num_heads"]
    fields["head_dim"] = fields["hidden_size"] // fields["num_heads"]
    fields["intermediate_size"] = d.get("ffn_hidden_size") or 4 * fields["hidden_size"]
    fields["rms_norm_eps"] = d.get("layer_norm_epsilon", 1e-5)
    fields["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", True))
    fields["qkv_bias"] = bool(d.get("bias", False))
    parallel = bool(d.get("parallel_attn", True))
    num_ln = d.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
    extra = {"new_arch": new_arch, "parallel": parallel or new_arch, "two_norms": new_arch and parallel and num_ln == 2,
             "alibi": bool(d.get("alibi", False)), "hidden_act": d.get("activation", "gelu")}  # fmt: skip
    if extra["alibi"]:
        fields["rope_scaling"] = None
    return ModelConfig(**fields, extra=extra)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's per-head slopes (BLOOM / Falcon / MPT), for any head count."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** (2 * i + 1) for i in range(min(closest, num_heads - closest))]
    return torch.tensor(slopes, dtype=torch.float32)


class FalconAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, attention_backend: str, kernel_backend: str,
                 prefix: str = "") -> None:  # fmt: skip
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.query_key_value = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias,
                                      backend=kernel_backend,
                                      quant_method=linear_method(cfg.quantization, f"{prefix}.query_key_value"))
        self.dense = Linear(self.q_size, cfg.hidden_size, bias=cfg.qkv_bias, backend=kernel_backend,
                            quant_method=linear_method(cfg.quantization, f"{prefix}.dense"))
        scale = cfg.head_dim**-0.5
        # HF adds the ALiBi bias before scaling the logits: the slopes are scaled too
        slopes = alibi_slopes(cfg.num_heads) * scale if cfg.extra["alibi"] else None
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rotary, scale=scale,
                                   alibi_slopes=slopes, attention_backend=attention_backend,
                                   kernel_backend=kernel_backend)  # fmt: skip

    def forward(self, positions, x, kv_cache, meta):
        q, k, v = self.query_key_value(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        return self.dense(self.attn(positions, q, k, v, kv_cache, meta))


class FalconMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, kernel_backend: str, prefix: str = "") -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.qkv_bias, backend=kernel_backend,
                                    quant_method=linear_method(cfg.quantization, f"{prefix}.dense_h_to_4h"))
        self.dense_4h_to_h = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.qkv_bias, backend=kernel_backend,
                                    quant_method=linear_method(cfg.quantization, f"{prefix}.dense_4h_to_h"))
        self.act = activation(cfg.extra["hidden_act"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, attention_backend: str, kernel_backend: str,
                 prefix: str = "") -> None:  # fmt: skip
        """``prefix``: the HF module name (``transformer.h.0``), for the quantization config's per-layer choices."""
        super().__init__()
        self.parallel, self.two_norms = cfg.extra["parallel"], cfg.extra["two_norms"]
        self.self_attention = FalconAttention(cfg, rotary, attention_backend, kernel_backend,
                                              f"{prefix}.self_attention")  # fmt: skip
        self.mlp = FalconMLP(cfg, kernel_backend, f"{prefix}.mlp")
        eps = cfg.rms_norm_eps
        if self.two_norms:
            self.ln_attn = LayerNorm(cfg.hidden_size, eps)
            self.ln_mlp = LayerNorm(cfg.hidden_size, eps)
        else:
            self.input_layernorm = LayerNorm(cfg.hidden_size, eps)
            if not self.parallel:
                self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps)

    def forward(self, positions, hidden, kv_cache, meta):
        attn_in = self.ln_attn(hidden) if self.two_norms else self.input_layernorm(hidden)
        attn = self.self_attention(positions, attn_in, kv_cache, meta)
        if not self.parallel:
            hidden = hidden + attn
            return hidden + self.mlp(self.post_attention_layernorm(hidden))
        mlp_in = self.ln_mlp(hidden) if self.two_norms else attn_in
        return hidden + (self.mlp(mlp_in) + attn)


class FalconForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, *, attention_backend: str = "auto", kernel_backend: str = "auto") -> None:
        super().__init__()
        self.config = cfg
        self.attention_backend, self.kernel_backend = resolve_backends(attention_backend, kernel_backend)
        rotary_dim = 0 if cfg.extra["alibi"] else cfg.head_dim
        rotary = RotaryEmbedding(rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.h = nn.ModuleList(FalconDecoderLayer(cfg, rotary, self.attention_backend, self.kernel_backend,
                                                  f"transformer.h.{i}") for i in range(cfg.num_layers))  # fmt: skip
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (self.word_embeddings if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, backend=self.kernel_backend))  # fmt: skip

    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids)
        for layer, kv_cache in zip(self.h, kv_caches):
            hidden = layer(positions, hidden, kv_cache, meta)
        return self.ln_f(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return skinny_linear(hidden, self.lm_head.weight, out_dtype=torch.float32, backend=self.kernel_backend)

    def _qkv_to_q_k_v(self, tensor: torch.Tensor) -> torch.Tensor:
        """The checkpoint's fused qkv rows (weight or bias) reordered into q | k | v."""
        cfg = self.config
        d, hq, hk = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        rest = tensor.shape[1:]
        if cfg.extra["new_arch"]:  # per KV head: its group of queries, then its key, then its value
            grouped = tensor.reshape(hk, hq // hk + 2, d, *rest)
            parts = (grouped[:, :-2], grouped[:, -2], grouped[:, -1])
        elif hk == hq:  # per head: q, k, v
            grouped = tensor.reshape(hq, 3, d, *rest)
            parts = (grouped[:, 0], grouped[:, 1], grouped[:, 2])
        else:  # multi-query: already all queries, then the key, then the value
            return tensor
        return torch.cat([p.reshape(-1, *rest) for p in parts])

    def _place(self, name: str, tensor: torch.Tensor):
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return []
        name = name.removeprefix("transformer.")
        if ".self_attention.query_key_value." in name:
            quant = self.config.quantization
            if quant is None:
                tensor = self._qkv_to_q_k_v(tensor)
            else:  # each of the method's tensors reordered where it holds the output features
                cfg = self.config
                order = self._qkv_to_q_k_v(torch.arange((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim))
                tensor = quant.permute_outputs(name, tensor, order)
        return [(name, None, tensor)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return weight_utils.load_weights(self, weights, self._place, self.config.architecture)

    def init_dummy_weights(self, seed: int = 0) -> None:
        weight_utils.init_dummy_weights(self, seed)
