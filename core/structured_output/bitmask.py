"""Apply an xgrammar token bitmask to logits on the device: ``kernels.token_bitmask`` (one Triton launch on CUDA, a
few tensor ops otherwise), and a per-token reference for tests."""

from __future__ import annotations

import torch

from kernels.token_bitmask import apply_token_bitmask

__all__ = ["apply_token_bitmask", "apply_token_bitmask_reference"]


def apply_token_bitmask_reference(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """Plain per-token reference of ``apply_token_bitmask`` (tests only)."""
    out = logits.clone()
    for i, row in enumerate(rows):
        for token in range(logits.shape[-1]):
            word, bit = divmod(token, 32)
            if not (int(bitmask[i, word]) >> bit) & 1:
                out[row, token] = float("-inf")
    return out
