"""Qwen2-MoE (shared expert behind a sigmoid gate, qkv bias) and Qwen3-MoE (q/k norm, 128 experts / top-8 in the
30B-A3B config): the MoE decoder of core/models/mixtral.py with Qwen's config reading — ``norm_topk_prob`` (renormalise
the top-k weights or not), ``decoder_sparse_step`` and ``mlp_only_layers`` (which layers keep a dense MLP)."""

from __future__ import annotations

from typing import Any

from core.config import common_fields
from core.models.mixtral import SUPPORTED_QUANTIZATION as SUPPORTED_QUANTIZATION  # the family's: Mixtral's
from core.models.mixtral import MoeConfig, MoeForCausalLM, check_silu


def num_experts(d: dict[str, Any]) -> int:
    """``num_experts`` in Qwen's checkpoints, ``num_local_experts`` as transformers 5 saves it."""
    return int(d.get("num_experts", d.get("num_local_experts", 0)) or 0)


def sparse_layers(d: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    """HF's rule: layer ``i`` is sparse unless listed in ``mlp_only_layers``, when experts exist and
    ``(i + 1) % decoder_sparse_step == 0``."""
    mlp_only = set(d.get("mlp_only_layers") or [])
    step = int(d.get("decoder_sparse_step", 1) or 1)
    return tuple(i not in mlp_only and num_experts(d) > 0 and (i + 1) % step == 0 for i in range(num_layers))


def read_config(d: dict[str, Any], architecture: str) -> MoeConfig:
    check_silu(d)
    fields = common_fields(d, architecture)
    if architecture == "Qwen2MoeForCausalLM":
        fields["qkv_bias"] = bool(d.get("qkv_bias", True))  # always on before the field existed
        shared = int(d.get("shared_expert_intermediate_size", 0) or 0)
    else:  # Qwen3-MoE
        if d.get("attention_bias"):
            raise ValueError("attention_bias=True is not supported for Qwen3MoeForCausalLM (o_proj has no bias here).")
        fields["qk_norm"] = True
        shared = 0
    return MoeConfig(**fields, num_experts=num_experts(d), num_experts_per_tok=d["num_experts_per_tok"],
                     moe_intermediate_size=d["moe_intermediate_size"],
                     norm_topk_prob=bool(d.get("norm_topk_prob", False)), shared_expert_intermediate_size=shared,
                     sparse_layers=sparse_layers(d, fields["num_layers"]))  # fmt: skip


Qwen2MoeForCausalLM = MoeForCausalLM
Qwen3MoeForCausalLM = MoeForCausalLM
