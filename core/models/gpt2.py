"""GPT-2: learned absolute position embeddings (no rotary), Conv1D weights (stored ``[in, out]``, transposed at load),
LayerNorm with bias, gelu_new MLP, tied head. Checkpoints with or without the ``transformer.`` prefix load."""

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

# Methods applied at load to this family's 16-bit checkpoints (``--quantization fp8`` / ``bitsandbytes``); quantized
# checkpoints of it are refused: its Conv1D weights are stored transposed, so a quantized checkpoint's packed tensors
# would need their own transposition. GGUF files store them as linear weights, which keep their blocks.
ONLINE_QUANTIZATION = ("fp8", "bitsandbytes")
SUPPORTED_QUANTIZATION = ("gguf",)

# GPT-2's config names -> the common ones
_ALIASES = {"n_embd": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
            "n_positions": "max_position_embeddings", "n_inner": "intermediate_size"}  # fmt: skip
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_config(d: dict[str, Any], architecture: str) -> ModelConfig:
    aliased = {**d, **{new: d[old] for old, new in _ALIASES.items() if d.get(old) is not None}}
    fields = common_fields(aliased, architecture)
    fields["rms_norm_eps"] = d.get("layer_norm_epsilon", 1e-5)
    fields["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", True))
    fields["rope_scaling"] = None
    extra = {"hidden_act": d.get("activation_function", "gelu_new"),
             "scale_attn_weights": bool(d.get("scale_attn_weights", True)),
             "scale_by_layer": bool(d.get("scale_attn_by_inverse_layer_idx", False))}  # fmt: skip
    return ModelConfig(**fields, extra=extra)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, layer: int, attention_backend: str,
                 kernel_backend: str) -> None:  # fmt: skip
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        prefix = f"transformer.h.{layer}.attn"
        self.c_attn = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True, backend=kernel_backend,
                             quant_method=linear_method(cfg.quantization, f"{prefix}.c_attn"))
        self.c_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, backend=kernel_backend,
                             quant_method=linear_method(cfg.quantization, f"{prefix}.c_proj"))
        scale = cfg.head_dim**-0.5 if cfg.extra["scale_attn_weights"] else 1.0
        if cfg.extra["scale_by_layer"]:
            scale /= layer + 1
        self.attn = PagedAttention(cfg.num_heads, cfg.num_heads, cfg.head_dim, rotary, scale=scale,
                                   attention_backend=attention_backend, kernel_backend=kernel_backend)  # fmt: skip

    def forward(self, positions, x, kv_cache, meta):
        q, k, v = self.c_attn(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        return self.c_proj(self.attn(positions, q, k, v, kv_cache, meta))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, kernel_backend: str, prefix: str = "") -> None:
        super().__init__()
        self.c_fc = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, backend=kernel_backend,
                           quant_method=linear_method(cfg.quantization, f"{prefix}.c_fc"))
        self.c_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, backend=kernel_backend,
                             quant_method=linear_method(cfg.quantization, f"{prefix}.c_proj"))
        self.act = activation(cfg.extra["hidden_act"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, layer: int, attention_backend: str,
                 kernel_backend: str) -> None:  # fmt: skip
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = GPT2Attention(cfg, rotary, layer, attention_backend, kernel_backend)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GPT2MLP(cfg, kernel_backend, f"transformer.h.{layer}.mlp")

    def forward(self, positions, hidden, kv_cache, meta):
        hidden = hidden + self.attn(positions, self.ln_1(hidden), kv_cache, meta)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig, *, attention_backend: str = "auto", kernel_backend: str = "auto") -> None:
        super().__init__()
        self.config = cfg
        self.attention_backend, self.kernel_backend = resolve_backends(attention_backend, kernel_backend)
        no_rotary = RotaryEmbedding(0, cfg.max_position_embeddings, cfg.rope_theta, None)
        self.wte = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, no_rotary, i, self.attention_backend, self.kernel_backend)
                               for i in range(cfg.num_layers))  # fmt: skip
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (self.wte if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, backend=self.kernel_backend))  # fmt: skip

    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.wte(input_ids) + self.wpe(positions)
        for block, kv_cache in zip(self.h, kv_caches):
            hidden = block(positions, hidden, kv_cache, meta)
        return self.ln_f(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return skinny_linear(hidden, self.lm_head.weight, out_dtype=torch.float32, backend=self.kernel_backend)

    def _place(self, name: str, tensor: torch.Tensor):
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # old checkpoints' causal-mask buffers
            return []
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return []
        name = name.removeprefix("transformer.")
        if name.endswith(_CONV1D) and tensor.dtype != torch.uint8:  # Conv1D keeps [in, out]; GGUF blocks are rows
            tensor = tensor.t()
        return [(name, None, tensor)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return weight_utils.load_weights(self, weights, self._place, self.config.architecture)

    def init_dummy_weights(self, seed: int = 0) -> None:
        weight_utils.init_dummy_weights(self, seed)
