"""The device bitmask op against its per-token reference, and grammar-text helpers."""

from __future__ import annotations

import torch

from core.structured_output.bitmask import apply_token_bitmask, apply_token_bitmask_reference
from core.structured_output.compiler import choice_grammar, xgrammar_message


def test_bitmask_matches_reference():
    gen = torch.Generator().manual_seed(0)
    for vocab in (31, 64, 100):
        logits = torch.randn(5, vocab, generator=gen)
        rows = [1, 3, 4]
        bitmask = torch.randint(-(2**31), 2**31 - 1, (3, -(-vocab // 32)), generator=gen, dtype=torch.int64).to(
            torch.int32)
        expected = apply_token_bitmask_reference(logits, rows, bitmask)
        got = apply_token_bitmask(logits.clone(), torch.tensor(rows), bitmask)
        assert torch.equal(got, expected)


def test_choice_grammar_escapes_and_xgrammar_messages():
    import xgrammar as xgr

    assert choice_grammar(['a"b', "c\\d"]) == 'root ::= "a\\"b" | "c\\\\d"'
    xgr.Grammar.from_ebnf(choice_grammar(['a"b', "c\\d", "new\nline"]))
    try:
        xgr.Grammar.from_regex("a(b")
    except RuntimeError as exc:
        assert xgrammar_message(exc).startswith("Regex parsing error")
