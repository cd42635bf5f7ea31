"""Apply an xgrammar token bitmask to logits on the device: a few tensor ops, no loop over rows or the vocabulary."""

from __future__ import annotations

import torch

_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set to -inf, in the given ``rows`` of ``logits`` [N, V], every token whose bit is 0 in ``bitmask``
    [len(rows), ceil(V / 32)] int32 (bit j of word w allows token 32 * w + j, xgrammar's layout). In place."""
    vocab = logits.shape[-1]
    shifts = _BIT_SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab].bool()
    constrained = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    return logits.index_copy_(0, rows, constrained)


def apply_token_bitmask_reference(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """Plain per-token reference of ``apply_token_bitmask`` (tests only)."""
    out = logits.clone()
    for i, row in enumerate(rows):
        for token in range(logits.shape[-1]):
            word, bit = divmod(token, 32)
            if not (int(bitmask[i, word]) >> bit) & 1:
                out[row, token] = float("-inf")
    return out
