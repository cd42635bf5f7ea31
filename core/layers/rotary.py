"""Rotary embedding tables for every HF ``rope_type`` (default, linear, llama3, dynamic, yarn, longrope);
kernels.attention_prep applies them.

The table holds, for each position ``p``, the rotation transformers applies to the token at ``p`` when ``p`` is the
newest position (so decode steps match ``generate`` exactly). ``dynamic`` rescales the base for
``p >= max_position_embeddings`` with ``seq_len = p + 1`` (per-row frequencies). ``longrope`` (Phi-3) rotates a whole
sequence with the short factors while it is at most ``original_max_position_embeddings`` long and with the long ones
past it: its table is two tables, short rows then long rows, and :meth:`RotaryEmbedding.table_positions` picks each
token's row from its sequence's length. (transformers also re-rotates the cached keys of a sequence that crosses the
limit while generating; here the keys already cached keep their short rotation, as in vLLM.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")


def _base_inv_freq(dim: int, theta: float | torch.Tensor) -> torch.Tensor:
    # float32, computed as HF computes it, so fp32 runs match transformers bit for bit
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(dim: int, theta: float, scaling: dict[str, Any], max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies, keep the high ones, ramp between; cos/sin scaled by the mscale."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / original
    attention_factor = scaling.get("attention_factor")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _longrope(dim: int, theta: float, scaling: dict[str, Any], max_positions: int, config_max_positions: int
              ) -> tuple[torch.Tensor, float]:  # fmt: skip
    """Phi-3 longrope / su: inverse frequencies [2P, dim/2] (P rows of short factors, then P of long), one
    attention factor."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config_max_positions / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short = 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float32) * theta**shape)
    long = 1.0 / (torch.tensor(scaling["long_factor"], dtype=torch.float32) * theta**shape)
    return torch.cat((short.expand(max_positions, -1), long.expand(max_positions, -1))), float(attention_factor)


def _dynamic(dim: int, theta: float, scaling: dict[str, Any], max_positions: int, config_max_positions: int
             ) -> torch.Tensor:  # fmt: skip
    """Dynamic NTK: from ``config_max_positions`` on, row ``p`` uses the base rescaled for ``seq_len = p + 1``."""
    factor = scaling["factor"]
    seq_len = torch.arange(1, max_positions + 1, dtype=torch.float64).clamp(min=config_max_positions)
    base = theta * ((factor * seq_len / config_max_positions) - (factor - 1)) ** (dim / (dim - 2))
    rows = seq_len > config_max_positions
    scaled = 1.0 / (base.float()[:, None] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return torch.where(rows[:, None], scaled, _base_inv_freq(dim, theta))


def rope_tables(dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
                config_max_positions: int | None = None) -> tuple[torch.Tensor, float]:  # fmt: skip
    """(inverse frequencies ``[dim/2]`` or per position ``[max_positions, dim/2]``, cos/sin scale).
    ``config_max_positions``: the checkpoint's ``max_position_embeddings`` (default ``max_positions``)."""
    config_max_positions = (scaling or {}).get("config_max_position_embeddings") or config_max_positions or max_positions
    kind = "default" if scaling is None else scaling.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"Unsupported rope_scaling type '{kind}' (supported: {', '.join(ROPE_TYPES)}).")
    if kind == "default":
        return _base_inv_freq(dim, theta), 1.0
    if kind == "linear":
        return _base_inv_freq(dim, theta) / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3(_base_inv_freq(dim, theta), scaling), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, scaling, config_max_positions)
    if kind == "longrope":
        return _longrope(dim, theta, scaling, max_positions, config_max_positions)
    return _dynamic(dim, theta, scaling, max_positions, config_max_positions), 1.0


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
                 config_max_positions: int | None = None) -> None:  # fmt: skip
        """``head_dim``: the rotated dims (0: no rotary, e.g. GPT-2's learned positions). The table is float32
        whatever the model dtype."""
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float32)
        self.max_positions = max_positions
        self.long_after = 0  # longrope: sequences longer than this use the second (long) half of the table
        if scaling is not None and scaling.get("rope_type") == "longrope":
            self.long_after = int(scaling["original_max_position_embeddings"])
            t = torch.cat((t, t))
        if head_dim == 0:
            self.register_buffer("cos_sin_cache", torch.empty(max_positions, 0), persistent=False)
            return
        inv_freq, scale = rope_tables(head_dim, max_positions, theta, scaling, config_max_positions)
        freqs = t[:, None] * inv_freq if inv_freq.dim() == 2 else torch.outer(t, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        self.register_buffer("cos_sin_cache", torch.cat((cos, sin), dim=-1), persistent=False)

    def table_positions(self, positions: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor
                        ) -> torch.Tensor:  # fmt: skip
        """The table row of each token: its position, or (longrope) its position in the long half when its
        sequence is longer than the original context. Tensor ops only: no host sync."""
        if not self.long_after:
            return positions
        per_seq = torch.repeat_interleave(seq_lens, query_start_loc[1:] - query_start_loc[:-1],
                                          output_size=positions.shape[0])  # fmt: skip
        return positions + (per_seq > self.long_after).to(positions.dtype) * self.max_positions
