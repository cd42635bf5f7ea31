"""Apply a grammar's token bitmask (xgrammar's layout) to logits in place: disallowed tokens become -inf.

Layout: ``bitmask[i]`` is ``ceil(V / 32)`` int32 words for logits row ``rows[i]``; bit ``j`` of word ``w`` allows
token ``32 * w + j``. Only the constrained rows are listed, so unconstrained rows cost nothing.

The Triton kernel is one launch over (constrained row, vocabulary block): each program reads its words once and
writes -inf only where a bit is 0, in place (no index_select / index_copy of the rows, no [rows, V] temporary). The
torch reference is a few tensor ops (no loop over rows or tokens) and is what CPU tensors run.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton

DEFAULT_BLOCK = 4096

_BYTE_BITS: dict[torch.device, torch.Tensor] = {}


def _byte_bits(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: bit j of byte value b."""
    table = _BYTE_BITS.get(device)
    if table is None:
        table = _BYTE_BITS[device] = ((torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device))
                                      & 1).bool()
    return table


def apply_token_bitmask_ref(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set to -inf, in the given ``rows`` of ``logits`` [N, V], every token whose bit is 0 in ``bitmask``
    [len(rows), >= ceil(V / 32)] int32. In place; returns ``logits``. The words are read as little-endian bytes
    through a 256-entry table (one byte per token of temporaries, not four)."""
    if rows.numel() == 0:
        return logits
    vocab = logits.shape[-1]
    words = bitmask[:, : -(-vocab // 32)].contiguous()
    if sys.byteorder != "little":
        raise RuntimeError("apply_token_bitmask_ref reads the bitmask's words as little-endian bytes")
    allowed = _byte_bits(logits.device)[words.view(torch.uint8).long()].view(words.shape[0], -1)[:, :vocab]
    constrained = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    return logits.index_copy_(0, rows, constrained)


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, logits_stride, rows_ptr, bitmask_ptr, bitmask_stride, vocab_size,
                                BLOCK: tl.constexpr):
    """Program (i, b): logits row ``rows[i]``, tokens ``[b * BLOCK, (b + 1) * BLOCK)``."""
    i = tl.program_id(0)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab_size
    row = tl.load(rows_ptr + i).to(tl.int64)
    words = tl.load(bitmask_ptr + i.to(tl.int64) * bitmask_stride + tokens // 32, mask=in_vocab, other=-1)
    disallowed = ((words >> (tokens % 32)) & 1) == 0
    ninf = tl.full((BLOCK,), float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * logits_stride + tokens, ninf, mask=in_vocab & disallowed)


def apply_token_bitmask_triton(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor, *,
                               block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """``apply_token_bitmask_ref`` in one kernel launch; no host sync (the row count is the host's ``len(rows)``)."""
    if rows.numel() == 0:
        return logits
    if logits.stride(-1) != 1 or bitmask.stride(-1) != 1:
        raise ValueError("apply_token_bitmask_triton needs unit last strides for logits and bitmask")
    vocab = logits.shape[-1]
    grid = (rows.numel(), triton.cdiv(vocab, block))
    _apply_token_bitmask_kernel[grid](logits, logits.stride(0), rows, bitmask, bitmask.stride(0), vocab,
                                      BLOCK=block, num_warps=4)
    return logits


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor, *,
                        backend: str = "auto") -> torch.Tensor:
    """The Triton kernel on CUDA unless ``backend`` is "torch", the reference otherwise. In place."""
    if use_triton(logits, backend):
        return apply_token_bitmask_triton(logits, rows, bitmask)
    return apply_token_bitmask_ref(logits, rows, bitmask)
