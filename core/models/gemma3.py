"""Gemma 3 (text): Gemma 2's decoder without soft-capping, with (1 + w) q/k norms and local (sliding) layers rotating
with their own RoPE base; the global layers' RoPE may be scaled (core/models/gemma.py runs it)."""

from __future__ import annotations

from typing import Any

from core.models.gemma import SUPPORTED_QUANTIZATION as SUPPORTED_QUANTIZATION  # the family's: Gemma's
from core.models.gemma import GemmaConfig, GemmaForCausalLM, gemma_fields


def read_config(d: dict[str, Any], architecture: str) -> GemmaConfig:
    rope = d.get("rope_parameters") or {}
    if "full_attention" in rope:  # transformers 5: one RoPE per layer type
        global_d = {**d, "rope_parameters": rope["full_attention"]}
        local = rope.get("sliding_attention") or {}
    else:
        global_d = d
        local = {"rope_theta": d.get("rope_local_base_freq", 10000.0)}
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"Gemma 3 local-layer RoPE type '{local['rope_type']}' is not supported (only default).")
    fields = gemma_fields(global_d, architecture)
    window = int(d.get("sliding_window") or 0)
    if window and not d.get("layer_types"):  # older configs: every sliding_window_pattern-th layer is global
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        fields["sliding_windows"] = tuple(window if (i + 1) % pattern else 0 for i in range(fields["num_layers"]))
    fields["qk_norm"] = True
    return GemmaConfig(
        **fields,
        sandwich_norms=True,
        attn_softcap=float(d.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(d.get("final_logit_softcapping") or 0.0),
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or fields["head_dim"]),
        local_rope_theta=float(local.get("rope_theta", 10000.0)),
    )


Gemma3ForCausalLM = GemmaForCausalLM
