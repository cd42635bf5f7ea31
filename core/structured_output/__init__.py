"""Constrained decoding (structured outputs) with xgrammar: grammars compile on a worker thread, each constrained
sequence owns a matcher advanced with its accepted tokens, and every step's token bitmask is filled on the host for
the constrained rows only and applied to the logits on the device before sampling.

Modules: ``compiler`` (torch-free: the frontend borrows its grammar-text helpers to check requests early),
``manager`` (per-sequence matchers and the step's bitmask), ``bitmask`` (the device op), ``tokenizer_info`` (the
vocabulary, from the tokenizer ``core/tokenizer.py`` loads for both processes).
"""
