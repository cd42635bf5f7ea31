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


def test_fill_threads_grow_with_the_rows_up_to_the_maximum():
    from core.structured_output.manager import fill_threads

    assert [fill_threads(n, 8, 64) for n in (1, 64, 65, 162, 256, 512, 4096)] == [1, 1, 2, 3, 4, 8, 8]
    assert fill_threads(16, 8, 0) == 8  # 0 rows per thread: always the maximum (xgrammar's own split)
    assert fill_threads(300, 1, 64) == 1


def test_a_fill_split_over_threads_gives_the_masks_of_one_thread():
    """The manager's filler for many rows (several C++ threads) writes exactly the masks one thread writes."""
    import torch

    from core.structured_output.manager import StructuredOutputManager

    info = xgr.TokenizerInfo(VOCAB, stop_token_ids=[5])
    grammar = xgr.GrammarCompiler(info).compile_regex(r"(ab|ac)c*")
    matchers = [xgr.GrammarMatcher(grammar) for _ in range(130)]
    for i, matcher in enumerate(matchers):  # three states: start, after "a", after "ab"
        for token in [0, 1][: i % 3]:
            assert matcher.accept_token(token)
    manager = StructuredOutputManager(lambda: info, len(VOCAB), 130, grammar_threads=4)
    manager.rows_per_fill_thread = 32
    split = torch.zeros(130, 1, dtype=torch.int32)
    manager._batch_filler(130).batch_fill_next_token_bitmask(matchers, split)
    assert sorted(manager._fillers) == [4]
    one = torch.zeros(130, 1, dtype=torch.int32)
    xgr.BatchGrammarMatcher(max_threads=1).batch_fill_next_token_bitmask(matchers, one)
    assert torch.equal(split, one) and len({tuple(row.tolist()) for row in one}) == 3
