"""Mixture-of-experts decoders on the Llama attention: Mixtral (every layer sparse, top-k weights renormalised) and,
through core/models/qwen_moe.py, Qwen2-MoE (shared expert) and Qwen3-MoE (q/k norm). A layer's MLP is either a
:class:`~core.layers.moe.SparseMoeBlock` or, for Qwen's dense layers (``mlp_only_layers`` / ``decoder_sparse_step``),
the Llama MLP.

Loading stacks HF's per-expert tensors (``block_sparse_moe.experts.{i}.w1/w3/w2`` for Mixtral,
``mlp.experts.{i}.gate_proj/up_proj/down_proj`` for Qwen) into the block's ``w13`` / ``w2``; transformers 5's fused
``mlp.experts.gate_up_proj`` / ``down_proj`` tensors are accepted too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.config import ModelConfig, common_fields
from core.layers.moe import SparseMoeBlock
from core.layers.norm import RMSNorm
from core.layers.rotary import RotaryEmbedding
from core.layers.linear import lm_head, token_embedding
from core.models.llama import MLP, Attention, DecoderLayer, LlamaForCausalLM, LlamaModel
from kernels.backend import resolve_backends

# Weight quantization methods the family runs (core/layers/quantization): the dense projections' and, in the fused
# MoE kernel, the experts' (fp8: w8a16; AWQ / GPTQ: int4 dequantized in registers; GGUF: decoded from the file's
# blocks; bitsandbytes and NVFP4: 4-bit codes looked up; experts_int8: only the experts, int8 at load); the router
# stays unquantized.
SUPPORTED_QUANTIZATION = ("fp8", "awq", "gptq", "gguf", "bitsandbytes", "experts_int8", "nvfp4")


@dataclass(frozen=True)
class MoeConfig(ModelConfig):
    """``intermediate_size`` is the dense MLP's (Qwen's mlp-only layers); ``moe_intermediate_size`` each expert's."""

    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    sparse_layers: tuple[bool, ...] = ()


def check_silu(d: dict[str, Any]) -> None:
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act='{act}' is not supported for {d.get('architectures')}: only 'silu'.")


def read_config(d: dict[str, Any], architecture: str) -> MoeConfig:
    """Mixtral: ``num_local_experts`` experts of ``intermediate_size``, top ``num_experts_per_tok``, always
    renormalised (softmax over the top-k logits), every layer sparse."""
    check_silu(d)
    fields = common_fields(d, architecture)
    return MoeConfig(**fields, num_experts=d["num_local_experts"], num_experts_per_tok=d["num_experts_per_tok"],
                     moe_intermediate_size=fields["intermediate_size"], norm_topk_prob=True,
                     sparse_layers=(True,) * fields["num_layers"])  # fmt: skip


class MoeDecoderLayer(DecoderLayer):
    """The Llama decoder layer (its ``forward``) with a sparse MoE block or a dense MLP."""

    def __init__(self, cfg: MoeConfig, rotary: RotaryEmbedding, attention_backend: str, kernel_backend: str,
                 layer: int) -> None:  # fmt: skip
        nn.Module.__init__(self)
        self.self_attn = Attention(cfg, rotary, attention_backend, kernel_backend, cfg.layer_window(layer),
                                   prefix=f"model.layers.{layer}.self_attn")
        prefix = f"model.layers.{layer}.mlp"
        if cfg.sparse_layers[layer]:
            self.mlp = SparseMoeBlock(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                                      cfg.num_experts_per_tok, cfg.norm_topk_prob, kernel_backend=kernel_backend,
                                      shared_expert_inter=cfg.shared_expert_intermediate_size,
                                      quant=cfg.quantization, prefix=prefix)  # fmt: skip
        else:
            self.mlp = MLP(cfg, kernel_backend, prefix=prefix)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend=kernel_backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend=kernel_backend)


class MoeModel(LlamaModel):
    def __init__(self, cfg: MoeConfig, attention_backend: str, kernel_backend: str) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = token_embedding(cfg, kernel_backend)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(
            MoeDecoderLayer(cfg, rotary, attention_backend, kernel_backend, i) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend=kernel_backend)


# HF expert tensor -> (which stacked parameter, which half of w13); an fp8 checkpoint's scales go beside it
_EXPERT_TENSOR = re.compile(r"\.mlp\.experts\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\."
                            r"(weight|weight_scale|weight_scale_inv|input_scale|qweight|qzeros|scales|g_idx"
                            r"|weight_packed|weight_g_idx|weight_absmax|weight_quant_map|weight_scale_2"
                            r"|weight_global_scale)$")
_STACKED_GGUF = re.compile(r"\.mlp\.experts\.(gate|up|down)_proj\.weight$")  # core/gguf.py: expert_stack_name
_EXPERT_SLOT = {"w1": ("w13", 0), "gate_proj": ("w13", 0), "w3": ("w13", 1), "up_proj": ("w13", 1),
                "w2": ("w2", 0), "down_proj": ("w2", 0)}  # fmt: skip


class MoeForCausalLM(LlamaForCausalLM):
    """Mixtral, Qwen2-MoE and Qwen3-MoE: the Llama causal LM with :class:`MoeModel` and expert-stacking loading."""

    def __init__(self, cfg: MoeConfig, *, attention_backend: str = "auto", kernel_backend: str = "auto") -> None:
        nn.Module.__init__(self)  # not LlamaForCausalLM's: it would allocate a dense model first
        self.config = cfg
        self.attention_backend, self.kernel_backend = resolve_backends(attention_backend, kernel_backend)
        self.model = MoeModel(cfg, self.attention_backend, self.kernel_backend)
        self.lm_head = lm_head(cfg, self.model.embed_tokens, self.kernel_backend)

    def _place(self, name: str, tensor: torch.Tensor):
        cfg = self.config
        name = name.replace(".block_sparse_moe.", ".mlp.")
        name = name.replace(".mlp.shared_expert_gate.", ".mlp.shared_expert.gate.")
        expert = _EXPERT_TENSOR.search(name)
        if expert is not None:
            index, which = int(expert.group(1)), expert.group(2)
            param, half = _EXPERT_SLOT[which]
            prefix = name[: expert.start()]
            inter = cfg.moe_intermediate_size
            row = index * 2 * inter + half * inter if param == "w13" else index * cfg.hidden_size
            suffix = "" if expert.group(3) == "weight" else f"_{expert.group(3)}"
            if suffix.endswith("g_idx"):  # one row per expert projection: [experts * projections, inputs]
                tensor = tensor.reshape(1, -1)
            return [(f"{prefix}.mlp.{param}{suffix}", row, tensor)]
        stack = _STACKED_GGUF.search(name)
        if stack is not None and tensor.dim() == 3:  # a GGUF file's experts kept in their blocks [E, rows, bytes]
            row = cfg.moe_intermediate_size if stack.group(1) == "up" else 0
            return [(name[: stack.start()] + (".mlp.w2" if stack.group(1) == "down" else ".mlp.w13"), row, tensor)]
        if name.endswith(".mlp.experts.gate_up_proj"):  # transformers 5's fused layout [E, 2I, H]
            return [(name.replace(".mlp.experts.gate_up_proj", ".mlp.w13"), 0, tensor.reshape(-1, tensor.shape[-1]))]
        if name.endswith(".mlp.experts.down_proj"):  # [E, H, I]
            return [(name.replace(".mlp.experts.down_proj", ".mlp.w2"), 0, tensor.reshape(-1, tensor.shape[-1]))]
        shared = cfg.shared_expert_intermediate_size
        for hf, offset in ((".mlp.shared_expert.gate_proj.", 0), (".mlp.shared_expert.up_proj.", shared)):
            if hf in name:
                return [(name.replace(hf, ".mlp.shared_expert.gate_up_proj."), offset, tensor)]
        return super()._place(name, tensor)


MixtralForCausalLM = MoeForCausalLM
