"""The batched grammar path (the previous tokens accepted and the masks filled by batched xgrammar calls on grammar
threads while the engine thread builds the previous step's outputs and the forward runs) against the per-sequence
path: the same masks at every step and the same tokens, under async scheduling, with constrained, terminated
(ignore_eos) and unconstrained rows mixed."""

from __future__ import annotations

import json

import pytest
import torch

from ipc.messages import FinishReason, SamplingParams, StructuredOutputsParams
from tests.core.engine_utils import make_engine, run_engine
from tests.frontend.model_files import tiny_llama_dir

PROMPTS = [[1, 2, 3, 4], [5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15, 16], [17, 18, 19]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama-batched"))


def _params() -> list[SamplingParams]:
    json_object = StructuredOutputsParams(json_object=True)
    return [
        SamplingParams(temperature=1.0, seed=1, max_tokens=20, structured_outputs=json_object),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=2, n=2, max_tokens=20,
                       structured_outputs=StructuredOutputsParams(regex=r"(cat|dog)s? [0-9]{2,4}")),
        # Past the grammar's end with ignore_eos: a terminated matcher whose row allows anything.
        SamplingParams(temperature=1.0, seed=3, max_tokens=16, ignore_eos=True,
                       structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
        SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=4, max_tokens=20, structured_outputs=json_object),
    ]


def _tokens(results) -> dict:
    return {k: v["tokens"] for k, v in results.items()}


def test_batched_masks_and_tokens_match_per_sequence(model):
    engine = make_engine(model, async_scheduling=True, max_num_seqs=16)
    manager = engine.structured
    manager.overlap = True  # grammar threads even on a small CI machine
    fill = manager.bitmask
    compared = []

    def both(seqs, device, batch_rows=None):
        prepared = manager._prepared is not None
        got = fill(seqs, device, batch_rows)  # the masks the grammar threads filled (prepared), or filled now
        manager.batched = False
        reference = fill(seqs, device, batch_rows)  # one xgrammar call per sequence, on the same matcher states
        manager.batched = True
        got_rows = dict(zip(got[0].tolist(), got[1])) if got is not None else {}
        reference_rows = dict(zip(reference[0].tolist(), reference[1])) if reference is not None else {}
        for row, mask in got_rows.items():
            if row in reference_rows:
                assert torch.equal(mask, reference_rows[row]), row
            else:  # finished by the previous step's tokens after its mask was started: its sample is dropped
                assert seqs[row].key not in manager._handles
        assert set(reference_rows) <= set(got_rows)
        if got_rows:
            compared.append((len(got_rows), prepared))
        return got

    manager.bitmask = both
    batched = run_engine(engine, PROMPTS, _params())
    assert len(compared) > 10 and max(compared)[0] >= 5  # many steps, most constrained rows in one call
    assert sum(prepared for _, prepared in compared) >= len(compared) - 2  # filled off the engine thread

    per_sequence = make_engine(model, async_scheduling=True, max_num_seqs=16)
    per_sequence.structured.batched = False
    assert _tokens(run_engine(per_sequence, PROMPTS, _params())) == _tokens(batched)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    for key in ((0, 0), (5, 0)):
        if batched[key]["finish_reason"] == FinishReason.STOP:
            assert isinstance(json.loads(tokenizer.decode(batched[key]["tokens"], skip_special_tokens=True)), dict)
    assert len(batched[(3, 0)]["tokens"]) == 16
    assert tokenizer.decode(batched[(3, 0)]["tokens"][:1]) in ("yes", "no", "y", "n", "ye")
    # The unconstrained rows are what they are without any constrained request around them.
    alone = run_engine(make_engine(model, async_scheduling=True, max_num_seqs=16), [PROMPTS[1], PROMPTS[4]],
                       [_params()[1], _params()[4]])
    assert alone[(0, 0)]["tokens"] == batched[(1, 0)]["tokens"]


def test_constrained_steps_keep_async_scheduling(model):
    """A step with constrained decodes is launched while the previous step is still in flight (its forward is
    queued before the previous tokens are read), exactly like an unconstrained step; the masks still come after
    the previous tokens reach the matchers (same tokens as synchronous scheduling)."""
    engine = make_engine(model, async_scheduling=True, max_num_seqs=16)
    launch = engine.runner.launch
    overlapped = []

    def recording(plan, *args):
        by_slot = {engine.plan_builder.slot(seq.key): seq for children in engine._children.values() for seq in children}
        seqs = [by_slot[slot] for slot, samples in zip(plan.slots, plan.samples) if samples]
        constrained = [seq for seq in seqs
                       if seq.output_token_ids and seq.sampling_params.structured_outputs is not None]
        if constrained:
            overlapped.append(engine._inflight is not None)
        return launch(plan, *args)

    engine.runner.launch = recording
    got = run_engine(engine, PROMPTS, _params())
    assert overlapped and sum(overlapped) >= len(overlapped) - 1, overlapped
    reference = run_engine(make_engine(model, async_scheduling=False, max_num_seqs=16), PROMPTS, _params())
    assert _tokens(got) == _tokens(reference)


def test_grammar_job_runs_off_the_engine_thread_with_a_short_switch_interval(model):
    """The step's grammar job runs on the grammar thread while the engine thread does its Python bookkeeping; at
    CPython's default 5 ms switch interval the job would only get the GIL once the engine thread blocked for the
    masks (no overlap), so the interval is lowered while a job is in flight and restored once it is collected."""
    import sys
    import threading

    from core.structured_output.manager import GRAMMAR_SWITCH_INTERVAL_S

    engine = make_engine(model, async_scheduling=True, max_num_seqs=16)
    manager = engine.structured
    manager.overlap = True
    before = sys.getswitchinterval()
    engine_thread = threading.get_ident()
    jobs = []
    accept_and_fill = manager._accept_and_fill

    def recording(accept_keys, accept_matchers, accept_tokens, fill_matchers, *rest):
        jobs.append((threading.get_ident(), sys.getswitchinterval(), len(accept_matchers), len(fill_matchers)))
        return accept_and_fill(accept_keys, accept_matchers, accept_tokens, fill_matchers, *rest)

    manager._accept_and_fill = recording
    run_engine(engine, PROMPTS, _params())
    off_thread = [job for job in jobs if job[0] != engine_thread]
    assert off_thread and all(interval == pytest.approx(GRAMMAR_SWITCH_INTERVAL_S) for _, interval, _, _ in off_thread)
    assert any(accepted > 0 and filled > 0 for _, _, accepted, filled in off_thread)  # accept then fill, one job
    assert sys.getswitchinterval() == before


def _record_grammar_hand_offs(engine) -> list[tuple[bool, int]]:
    """(inside ``runner.launch``, number of tokens accepted) for every ``prepare`` call with tokens to accept."""
    launch, prepare = engine.runner.launch, engine.structured.prepare
    in_launch = [False]
    hand_offs: list[tuple[bool, int]] = []

    def launching(*args, **kwargs):
        in_launch[0] = True
        try:
            return launch(*args, **kwargs)
        finally:
            in_launch[0] = False

    def preparing(accepted_seqs, accepted_tokens, seqs):
        if accepted_tokens:
            hand_offs.append((in_launch[0], len(accepted_tokens)))
        return prepare(accepted_seqs, accepted_tokens, seqs)

    engine.runner.launch, engine.structured.prepare = launching, preparing
    return hand_offs


def test_grammar_job_starts_before_the_step_is_planned_when_the_previous_step_is_done(model):
    """With the step in flight already done on the device (always on CPU), its tokens go to the grammar job right
    after scheduling, before the next step's plan, staging and forward (which it then overlaps); while the device
    is still busy the hand-off waits for the forward to be queued, inside ``launch``. Same tokens either way, the
    same as synchronous scheduling."""
    from core.model_runner import StepHandle

    reference = _tokens(run_engine(make_engine(model, async_scheduling=False, max_num_seqs=16), PROMPTS, _params()))
    engine = make_engine(model, async_scheduling=True, max_num_seqs=16)
    engine.structured.overlap = True
    early = _record_grammar_hand_offs(engine)
    assert _tokens(run_engine(engine, PROMPTS, _params())) == reference
    assert len(early) > 10 and not any(inside for inside, _ in early), early

    busy = make_engine(model, async_scheduling=True, max_num_seqs=16)
    busy.structured.overlap = True
    late = _record_grammar_hand_offs(busy)
    ready = StepHandle.ready
    StepHandle.ready = lambda self: False  # the device still running the previous step
    try:
        assert _tokens(run_engine(busy, PROMPTS, _params())) == reference
    finally:
        StepHandle.ready = ready
    assert len(late) > 10 and all(inside for inside, _ in late), late


def test_a_failed_step_after_the_early_hand_off_keeps_the_grammar_in_step(model):
    """A step that fails after the previous step's tokens went to the grammar job (its plan raises) applies that
    previous step (it completed) rather than dropping it: its sequences keep the tokens their matchers accepted,
    so after the recompute every constrained output is exactly the one of a run without the failure."""
    prompts = PROMPTS[:4]
    json_object = StructuredOutputsParams(json_object=True)
    params = [SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=json_object),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=24,
                             structured_outputs=StructuredOutputsParams(regex=r"(cat|dog)s? [0-9]{2,4}!")),
              # Counted digits: a matcher one token ahead of its sequence would put the "x" a digit early.
              SamplingParams(temperature=0.0, max_tokens=24,
                             structured_outputs=StructuredOutputsParams(regex=r"[0-9]{6}x[0-9]{6}"))]
    expected = run_engine(make_engine(model, async_scheduling=True, max_num_seqs=16), prompts, params)
    engine = make_engine(model, async_scheduling=True, max_num_seqs=16)
    engine.structured.overlap = True
    early = _record_grammar_hand_offs(engine)

    class FailOnce:
        """Raises in the plan of the first step scheduled after a hand-off with request 3 three tokens in."""

        enabled = True
        fired = False

        def check(self, prompts):
            seq = engine._children["3"][0] if "3" in engine._children else None
            if not self.fired and early and seq is not None and seq.num_output_tokens == 3:
                self.fired = True
                raise RuntimeError("transient")

    engine._faults = FailOnce()
    got = run_engine(engine, prompts, params)
    assert engine._faults.fired
    assert _tokens(got) == _tokens(expected)
    assert all(r["finish_reason"] is not None for r in got.values())
    assert len(expected[(3, 0)]["tokens"]) >= 13  # the regex ran its course


def test_a_last_early_look_after_staging_starts_the_grammar_job_before_the_forward(model):
    """The step in flight done only once this step's inputs are staged (the first two looks miss): the third look,
    inside ``launch`` before the forward is queued, starts the grammar job; same tokens as synchronous scheduling."""
    from core.model_runner import StepHandle

    reference = _tokens(run_engine(make_engine(model, async_scheduling=False, max_num_seqs=16), PROMPTS, _params()))
    engine = make_engine(model, async_scheduling=True, max_num_seqs=16)
    engine.structured.overlap = True
    runner = engine.runner
    phase = {"staged": False, "forwarded": False}
    stage, forward, prepare = runner.inputs.stage, runner.model.forward, engine.structured.prepare
    hand_offs = []

    def staging(*args, **kwargs):
        phase["staged"], phase["forwarded"] = True, False
        return stage(*args, **kwargs)

    def forwarding(*args, **kwargs):
        phase["staged"], phase["forwarded"] = False, True
        return forward(*args, **kwargs)

    def preparing(accepted_seqs, accepted_tokens, seqs):
        if accepted_tokens:
            hand_offs.append(phase["staged"] and not phase["forwarded"])
        return prepare(accepted_seqs, accepted_tokens, seqs)

    runner.inputs.stage, runner.model.forward, engine.structured.prepare = staging, forwarding, preparing
    ready = StepHandle.ready
    StepHandle.ready = lambda self: phase["staged"]  # done on the device only once the next inputs are staged
    try:
        assert _tokens(run_engine(engine, PROMPTS, _params())) == reference
    finally:
        StepHandle.ready = ready
    assert len(hand_offs) > 10 and all(hand_offs), hand_offs
