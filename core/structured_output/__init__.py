"""Constrained decoding (structured outputs) with xgrammar: grammars compile on a worker thread, each constrained
sequence owns a matcher advanced with its accepted tokens, and every step's token bitmask is filled on the host for
the constrained rows only and applied to the logits on the device before sampling."""

from core.structured_output.bitmask import apply_token_bitmask
from core.structured_output.manager import StructuredOutputManager

__all__ = ["StructuredOutputManager", "apply_token_bitmask"]
