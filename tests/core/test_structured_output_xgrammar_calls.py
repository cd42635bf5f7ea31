"""The manager's direct xgrammar calls against xgrammar's public API: the batched accept through the core binding
(no per-row result conversion) advances the same matchers the same way and reports the same rejections."""

from __future__ import annotations

import pytest

xgr = pytest.importorskip("xgrammar")

from core.structured_output import manager as manager_module  # noqa: E402
from core.structured_output.manager import batch_accept_token  # noqa: E402

VOCAB = ["a", "b", "c", "{", "}", "</s>"]


def _matchers(n: int) -> list:
    info = xgr.TokenizerInfo(VOCAB, stop_token_ids=[5])
    grammar = xgr.GrammarCompiler(info).compile_regex(r"(ab|ac)c*")
    return [xgr.GrammarMatcher(grammar) for _ in range(n)]


def _masks(matchers) -> list[list[int]]:
    bitmask = xgr.allocate_token_bitmask(len(matchers), len(VOCAB))
    for i, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(bitmask, i)
    return bitmask.tolist()


@pytest.mark.parametrize("use_core", [True, False])
def test_batch_accept_token_matches_the_public_api(monkeypatch, use_core):
    if not use_core:  # an xgrammar without the core binding: the public call
        monkeypatch.setattr(manager_module, "_XGRAMMAR_CORE", [None])
    elif manager_module._xgrammar_core() is None:
        pytest.skip("this xgrammar has no core batch_accept_token")
    ours, reference = _matchers(4), _matchers(4)
    assert batch_accept_token(ours, [0, 0, 1, 3]) == [True, True, False, False]  # 'b' and '{' cannot start
    assert xgr.BatchGrammarMatcher.batch_accept_token(reference, [0, 0, 1, 3]) == [True, True, False, False]
    assert _masks(ours) == _masks(reference)
    assert batch_accept_token(ours, [1, 2, 0, 0]) is None  # every token accepted
    xgr.BatchGrammarMatcher.batch_accept_token(reference, [1, 2, 0, 0])
    assert _masks(ours) == _masks(reference)
    assert batch_accept_token(ours[:2], [5, 2]) is None  # the stop token ends "ab"; "ac" goes on with "c"
    assert ours[0].is_terminated() and not ours[1].is_terminated()
