"""Masks the grammar job filled for the previous step's rows (the engine starts it before scheduling) serve the next
step whatever its rows: reordered, with new sequences filled at the join, a sequence whose id came back with a
new matcher meanwhile filled afresh;
and the grammar thread's timer slack."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from ipc.messages import EngineRequest, SamplingParams, StructuredOutputsParams
from tests.core.engine_utils import make_engine
from tests.frontend.model_files import tiny_llama_dir

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama-prepared"))


def _constrained_sequences(engine, constraints: list[StructuredOutputsParams], prefix: str = "r") -> list:
    """One running-ready sequence per constraint, its grammar compiled and its matcher made."""
    seqs = []
    for i, constraint in enumerate(constraints):
        engine.add_request(EngineRequest(f"{prefix}{i}", [1 + i, 2, 3], SamplingParams(max_tokens=8,
                                                                                       structured_outputs=constraint)))
        seq = engine._children[f"{prefix}{i}"][0]
        while engine.structured.holds(seq):
            engine.structured.wait_for_compile(0.05)
        seqs.append(seq)
    return seqs


def _reference(manager, seqs: list) -> dict:
    """{row: mask} filled now, one xgrammar call per sequence, on the matchers' current states."""
    assert manager._prepared is None
    manager.batched = False
    try:
        got = manager.bitmask(seqs, CPU)
    finally:
        manager.batched = True
    return {} if got is None else {row: mask.clone() for row, mask in zip(got[0].tolist(), got[1])}


def _masks(got) -> dict:
    return {} if got is None else {row: mask.clone() for row, mask in zip(got[0].tolist(), got[1])}


def _first_allowed(mask: torch.Tensor) -> int:
    words = mask.long() & 0xFFFFFFFF
    word = int(torch.nonzero(words).flatten()[0])
    value = int(words[word])
    return 32 * word + (value & -value).bit_length() - 1


def test_masks_prepared_for_the_previous_rows_serve_a_reordered_step_with_new_rows(model):
    engine = make_engine(model, max_num_seqs=8)
    manager = engine.structured
    manager.overlap = True  # the job on the grammar thread even on a small machine
    json_object = StructuredOutputsParams(json_object=True)
    seqs = _constrained_sequences(engine, [json_object, StructuredOutputsParams(regex=r"(cat|dog)s? [0-9]{2,4}"),
                                           json_object, StructuredOutputsParams(choice=["yes", "no"])])
    engine.add_request(EngineRequest("p", [9, 9], SamplingParams(max_tokens=4)))
    plain = engine._children["p"][0]
    previous = [seqs[0], plain, seqs[1], seqs[2]]  # the previous step's rows; seqs[3] is new in the next step
    first = _reference(manager, previous)
    tokens = [_first_allowed(first[0]), 5, _first_allowed(first[2]), _first_allowed(first[3])]

    manager.prepare(previous, tokens, previous)  # what the engine's look before scheduling does
    assert manager._prepared is not None
    step = [seqs[2], seqs[3], plain, seqs[0], seqs[1]]  # reordered, one new sequence
    got = _masks(manager.bitmask(step, CPU))
    expected = _reference(manager, step)
    assert sorted(got) == sorted(expected) == [0, 1, 3, 4]
    for row in expected:
        assert torch.equal(got[row], expected[row]), row
    # The accepted tokens moved the matchers on: the masks differ from the first ones for some row.
    assert any(not torch.equal(got[step.index(s)], first[previous.index(s)]) for s in (seqs[0], seqs[1], seqs[2]))

    # A sequence removed while the job ran (finished: its sample is dropped) keeps its row; the others are unchanged.
    tokens = [_first_allowed(expected[3]), _first_allowed(expected[4]), _first_allowed(expected[0])]
    same_rows = [seqs[0], seqs[1], seqs[2]]
    manager.prepare(same_rows, tokens, same_rows)
    manager.remove(seqs[1].key)
    got = _masks(manager.bitmask(same_rows, CPU))
    expected = _reference(manager, same_rows)
    assert sorted(got) == [0, 1, 2] and sorted(expected) == [0, 2]
    for row in expected:
        assert torch.equal(got[row], expected[row]), row

    # Its id back with a new matcher before the join (a reused request id): that row is filled afresh.
    seqs[1] = same_rows[1] = _constrained_sequences(engine, [StructuredOutputsParams(regex=r"(cat|dog)s? [0-9]{2,4}")],
                                                    "again")[0]
    before = _reference(manager, same_rows)
    manager.prepare(same_rows, [_first_allowed(before[row]) for row in range(3)], same_rows)
    manager.remove(seqs[1].key)
    manager.add(seqs[1])
    while manager.holds(seqs[1]):
        manager.wait_for_compile(0.05)
    got = _masks(manager.bitmask(same_rows, CPU))
    expected = _reference(manager, same_rows)
    assert sorted(got) == sorted(expected) == [0, 1, 2]
    for row in expected:
        assert torch.equal(got[row], expected[row]), row
    engine.shutdown()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timer slack is a Linux setting")
def test_the_grammar_thread_asks_for_a_precise_timer_slack():
    from core.structured_output.manager import GRAMMAR_THREAD_TIMER_SLACK_NS, StructuredOutputManager

    manager = StructuredOutputManager(lambda: None, vocab_size=64, max_num_seqs=4, grammar_threads=1)
    libc = ctypes.CDLL(None, use_errno=True)
    pr_get_timerslack = 30
    try:
        on_thread = manager._grammar_pool().submit(libc.prctl, pr_get_timerslack, 0, 0, 0, 0).result()
    finally:
        manager.shutdown()
    assert on_thread == GRAMMAR_THREAD_TIMER_SLACK_NS
    assert libc.prctl(pr_get_timerslack, 0, 0, 0, 0) != GRAMMAR_THREAD_TIMER_SLACK_NS  # this thread: untouched
