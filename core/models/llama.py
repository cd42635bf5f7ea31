"""One decoder implementation for the Llama family: Llama 1/2/3 (llama3 RoPE scaling), Mistral, Qwen2 (qkv bias)
and Qwen3 (per-head q/k RMSNorm); GQA; tied or untied embeddings.

q/k/v and gate/up are merged into one projection each (fewer, larger GEMMs); ``load_weights`` takes HF names and
places each checkpoint tensor into its slice. The attention and kernel backends (kernels/backend.py) are given at
construction and handed to every layer, which passes them to the kernels it calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from core.config import ModelConfig, common_fields
from core.layers.attention import AttentionMetadata, PagedAttention
from core.layers.linear import Linear, head_logits, lm_head, token_embedding
from core.layers.norm import RMSNorm
from core.layers.quantization import linear_method
from core.layers.quantization.fp8 import fp8_mlp_half, fp8_mlp_half_config
from core.layers.rotary import RotaryEmbedding
from core.models import weights as weight_utils
from kernels.activation import silu_and_mul, silu_and_mul_fp8
from kernels.backend import resolve_backends
from kernels.fp8_linear import Fp8Activations, NormedRows

# Weight quantization methods this family's layers run (core/layers/quantization); the LM head stays unquantized
# except under gguf, which keeps the embedding and LM head in their blocks too.
SUPPORTED_QUANTIZATION = ("fp8", "awq", "gptq", "gguf", "bitsandbytes", "nvfp4")


def read_config(d: dict[str, Any], architecture: str) -> ModelConfig:
    """Llama, Mistral (``sliding_window`` on every layer), Qwen2 (qkv bias; ``use_sliding_window`` from
    ``max_window_layers`` on), Qwen3 (q/k norm)."""
    fields = common_fields(d, architecture)
    if architecture == "Qwen2ForCausalLM":
        fields["qkv_bias"] = True
    fields["qk_norm"] = architecture == "Qwen3ForCausalLM"
    return ModelConfig(**fields)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, attention_backend: str, kernel_backend: str,
                 sliding_window: int = 0, scale: float | None = None, softcap: float = 0.0,
                 prefix: str = "") -> None:  # fmt: skip
        """``scale`` None: 1/sqrt(head_dim); ``softcap`` 0: no logit soft-capping (Gemma 2 sets both). ``prefix``:
        the HF module name (``model.layers.0.self_attn``), for the quantization config's per-layer choices."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias,
                               backend=kernel_backend, output_sizes=(self.q_size, self.kv_size, self.kv_size),
                               quant_method=linear_method(cfg.quantization, f"{prefix}.q_proj"))  # fmt: skip
        self.o_proj = Linear(self.q_size, cfg.hidden_size, backend=kernel_backend,
                             quant_method=linear_method(cfg.quantization, f"{prefix}.o_proj"))
        if cfg.qk_norm:  # applied inside the fused prep kernel, which only reads their weights
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, backend=kernel_backend)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, backend=kernel_backend)
        else:
            self.q_norm = self.k_norm = None
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rotary, self.q_norm, self.k_norm,
                                   attention_backend=attention_backend, kernel_backend=kernel_backend,
                                   scale=scale, sliding_window=sliding_window, softcap=softcap)  # fmt: skip

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                project: bool = True) -> torch.Tensor:  # fmt: skip
        """``project`` False: attention's output before o_proj (which the caller's launch runs)."""
        q = self.attn.fused_qkv_prep(self.qkv_proj, x, positions, kv_cache, meta)  # fp8 decode: one launch
        if q is not None:
            return self._project(self.attn.attend(q, kv_cache, meta), project)
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        return self._project(self.attn(positions, q, k, v, kv_cache, meta), project)

    def forward_normed(self, positions: torch.Tensor, rows: NormedRows, kv_cache: torch.Tensor,
                       meta: AttentionMetadata, project: bool = True) -> torch.Tensor | None:  # fmt: skip
        """:meth:`forward` of rows whose input norm the qkv projection applies in its own launch (the fp8 decode
        GEMV), or None where it does not (then norm the rows and call :meth:`forward`)."""
        q = self.attn.fused_qkv_prep(self.qkv_proj, rows, positions, kv_cache, meta)
        return None if q is None else self._project(self.attn.attend(q, kv_cache, meta), project)

    def _project(self, attended: torch.Tensor, project: bool) -> torch.Tensor:
        return self.o_proj(attended) if project else attended


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, kernel_backend: str, prefix: str = "") -> None:
        super().__init__()
        self.kernel_backend = kernel_backend
        inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * inter, backend=kernel_backend, output_sizes=(inter, inter),
                                   quant_method=linear_method(cfg.quantization, f"{prefix}.gate_proj"))
        self.down_proj = Linear(inter, cfg.hidden_size, backend=kernel_backend,
                                quant_method=linear_method(cfg.quantization, f"{prefix}.down_proj"))

    def forward(self, x: torch.Tensor | Fp8Activations) -> torch.Tensor:
        h = self.gate_up_proj.silu_and_mul_forward(x, self.down_proj)  # fp8 decode: one launch fewer
        if h is not None:
            return self.down_proj(h)  # its GEMV quantizes h itself
        gate_up = self.gate_up_proj(x)
        if gate_up.dim() == 2 and self.down_proj.takes_fp8_activations():  # quantized in the activation's launch
            return self.down_proj(silu_and_mul_fp8(gate_up, backend=self.kernel_backend))
        return self.down_proj(silu_and_mul(gate_up, backend=self.kernel_backend))

    def forward_normed(self, rows: NormedRows) -> torch.Tensor | None:
        """:meth:`forward` of rows whose norm gate_up's fp8 decode GEMV applies in its own launch (with SiLU-and-mul
        in its epilogue), or None where it does not (then norm the rows and call :meth:`forward`)."""
        h = self.gate_up_proj.silu_and_mul_forward(rows, self.down_proj)
        return None if h is None else self.down_proj(h)


def _reads_fp8(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is a W8A8 fp8 ``Linear`` that reads its input quantized upstream."""
    layer = getattr(module, name, None)
    return isinstance(layer, Linear) and layer.takes_fp8_activations()


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, attention_backend: str, kernel_backend: str,
                 layer: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.self_attn = Attention(cfg, rotary, attention_backend, kernel_backend, cfg.layer_window(layer),
                                   prefix=f"model.layers.{layer}.self_attn")
        self.mlp = MLP(cfg, kernel_backend, prefix=f"model.layers.{layer}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend=kernel_backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend=kernel_backend)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # W8A8 fp8 projections read the norms' outputs already quantized (one launch fewer each); where their table
        # entries say so (fp8_linear.norm_prologue_configured), decode GEMVs apply the norms themselves
        quantize_qkv = _reads_fp8(self.self_attn, "qkv_proj")
        # W8A8 fp8 decode: o_proj, the post-attention norm and the MLP may run as one launch (its table's shapes)
        mlp_half = fp8_mlp_half_config(hidden, self.self_attn.o_proj, getattr(self.mlp, "gate_up_proj", None),
                                       getattr(self.mlp, "down_proj", None))  # fmt: skip
        project = mlp_half is None
        attended = None
        if quantize_qkv and self.self_attn.qkv_proj.may_norm_rows():
            rows = self.input_layernorm.pending(hidden, residual)
            attended = self.self_attn.forward_normed(positions, rows, kv_cache, meta, project)
            if attended is not None:
                residual = hidden if residual is None else rows.norm.residual_out
        if attended is None:
            if residual is None:
                residual = hidden
                hidden = self.input_layernorm(hidden, quantize_fp8=quantize_qkv)
            else:
                hidden, residual = self.input_layernorm(hidden, residual, quantize_fp8=quantize_qkv)
            attended = self.self_attn(positions, hidden, kv_cache, meta, project)
        if mlp_half is not None:
            fused = fp8_mlp_half(attended, residual, self.self_attn.o_proj, self.post_attention_layernorm,
                                 self.mlp.gate_up_proj, self.mlp.down_proj, mlp_half)  # fmt: skip
            if fused is not None:
                return fused
            attended = self.self_attn.o_proj(attended)
        hidden = attended
        quantize_gate_up = _reads_fp8(self.mlp, "gate_up_proj")  # MoE blocks: no such layer
        if quantize_gate_up and self.mlp.gate_up_proj.may_norm_rows():  # the gate_up decode GEMV norms the rows
            rows = self.post_attention_layernorm.pending(hidden, residual)
            out = self.mlp.forward_normed(rows)
            if out is not None:
                return out, rows.norm.residual_out
        hidden, residual = self.post_attention_layernorm(hidden, residual, quantize_fp8=quantize_gate_up)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_backend: str, kernel_backend: str) -> None:
        super().__init__()
        self.embed_tokens = token_embedding(cfg, kernel_backend)
        # One cos/sin table for all layers (Llama 3.1's 128k positions take 64 MB).
        rotary_dim = cfg.extra.get("rotary_dim", cfg.head_dim)  # Phi-3's partial rotary
        rotary = RotaryEmbedding(rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, rotary, attention_backend, kernel_backend, i) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend=kernel_backend)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, *, attention_backend: str = "auto", kernel_backend: str = "auto") -> None:
        """``attention_backend`` / ``kernel_backend``: "auto", "triton" or "torch" (kernels/backend.py); a "torch"
        kernel backend puts attention on its reference too."""
        super().__init__()
        self.config = cfg
        self.attention_backend, self.kernel_backend = resolve_backends(attention_backend, kernel_backend)
        self.model = LlamaModel(cfg, self.attention_backend, self.kernel_backend)
        self.lm_head = lm_head(cfg, self.model.embed_tokens, self.kernel_backend)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(self.lm_head, hidden, self.kernel_backend)

    # ------------------------------------------------------------------------------------------------ weights
    def _param_slices(self) -> dict[str, tuple[str, int, int]]:
        """HF checkpoint name suffix -> (our parameter suffix, row offset, row count) for merged projections."""
        cfg = self.config
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        return {
            "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
            "self_attn.k_proj": ("self_attn.qkv_proj", q, kv),
            "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, kv),
            "mlp.gate_proj": ("mlp.gate_up_proj", 0, inter),
            "mlp.up_proj": ("mlp.gate_up_proj", inter, inter),
        }

    def _place(self, name: str, tensor: torch.Tensor):
        if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
            return []
        for hf, (ours, offset, _) in self._param_slices().items():
            if f".{hf}." in name:
                return [(name.replace(f".{hf}.", f".{ours}."), offset, tensor)]
        return [(name, None, tensor)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our parameters; returns the names of the parameters that were filled, and
        raises if any parameter was left empty."""
        return weight_utils.load_weights(self, weights, self._place, self.config.architecture)

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights for benchmarks (speed does not depend on values): small uniform, norms at one."""
        weight_utils.init_dummy_weights(self, seed)
