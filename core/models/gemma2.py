"""Gemma 2: Gemma plus attention and final logit soft-capping, alternating sliding-window / global layers,
``query_pre_attn_scalar`` and pre/post feedforward norms (the decoder is core/models/gemma.py's)."""

from __future__ import annotations

from typing import Any

from core.models.gemma import SUPPORTED_QUANTIZATION as SUPPORTED_QUANTIZATION  # the family's: Gemma's
from core.models.gemma import GemmaConfig, GemmaForCausalLM, gemma_fields


def read_config(d: dict[str, Any], architecture: str) -> GemmaConfig:
    fields = gemma_fields(d, architecture)
    if d.get("sliding_window") and not d.get("layer_types"):
        # configs written before transformers' layer_types: even layers slide
        window = int(d["sliding_window"])
        fields["sliding_windows"] = tuple(window if i % 2 == 0 else 0 for i in range(fields["num_layers"]))
    return GemmaConfig(
        **fields,
        sandwich_norms=True,
        attn_softcap=float(d.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(d.get("final_logit_softcapping") or 0.0),
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or fields["head_dim"]),
    )


Gemma2ForCausalLM = GemmaForCausalLM
