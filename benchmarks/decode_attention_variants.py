"""The decode-attention launch configurations benchmarks/bench_decode_attention.py compares (exploration; the engine
uses kernels.decode_attention.DECODE_CONFIG and SPLIT_DECODE_CONFIG, which are the "lpt" and "fused" entries here).

What each knob does and why: kernels/NOTES.md ("Decode attention variants"). To run the engine with another one (in
process, before CUDA graphs are captured): ``set_decode_variant(name)``, e.g. ``python -m benchmarks.profile_step
--decode-variant lpt-db32-fused``.
"""

from __future__ import annotations

from kernels import decode_attention
from kernels.decode_attention import DecodeConfig

DECODE_VARIANTS: dict[str, DecodeConfig] = {
    "baseline": DecodeConfig(tile_n=64, num_warps=4, num_stages=2, order="head", fused_reduce=False),  # the original
    "seq": DecodeConfig(tile_n=64, num_warps=4, num_stages=2, order="seq", fused_reduce=False),
    "lpt": DecodeConfig(tile_n=64, num_warps=4, num_stages=2, order="lpt", fused_reduce=False),
    "fused": DecodeConfig(tile_n=64, num_warps=4, num_stages=2, order="head", fused_reduce=True),
    "db32": DecodeConfig(tile_n=32, num_warps=4, num_stages=5, order="head", fused_reduce=False),
    "db64": DecodeConfig(tile_n=64, num_warps=4, num_stages=5, order="head", fused_reduce=False),
    "lpt-db32": DecodeConfig(tile_n=32, num_warps=4, num_stages=5, order="lpt", fused_reduce=False),
    "lpt-db32-fused": DecodeConfig(tile_n=32, num_warps=4, num_stages=5, order="lpt", fused_reduce=True),
    "seq-db32-fused": DecodeConfig(tile_n=32, num_warps=4, num_stages=5, order="seq", fused_reduce=True),
    "lpt-db64-fused": DecodeConfig(tile_n=64, num_warps=4, num_stages=5, order="lpt", fused_reduce=True),
    # splits also at moderate batches (B=64 -> 3 splits), now that a split costs no extra launch
    "lpt-db32-fused-split": DecodeConfig(tile_n=32, num_warps=4, num_stages=5, order="lpt", fused_reduce=True,
                                         min_programs_per_sm=6, programs_per_sm=8),
}
# Measured on the H100 (benchmarks/bench_decode_attention.py, 2026-11-23): "lpt" with the runner's order is the
# fastest at batch 64-256 (W1 1.07x, W2 1.09x the baseline); when the batch is so small that the context is split,
# "fused" (one launch, last split merges) wins (batch 1: 1.10x). Hence the engine's defaults:
DEFAULT_DECODE_VARIANT = "lpt"  # kernels.decode_attention.DECODE_CONFIG
SPLIT_DECODE_VARIANT = "fused"  # kernels.decode_attention.SPLIT_DECODE_CONFIG


def set_decode_variant(name: str) -> DecodeConfig:
    """Make ``DECODE_VARIANTS[name]`` the engine's decode config for every batch size (launches made from now on)."""
    config = DECODE_VARIANTS[name]
    decode_attention.set_decode_configs(config)
    return config
