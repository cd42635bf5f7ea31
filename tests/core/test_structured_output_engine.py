"""Constrained decoding inside EngineCore on a tiny random Llama with SmolLM2's tokenizer: the mask holds under
async scheduling (same tokens as synchronous), n > 1 sequences each get a matcher, and a grammar that fails to
compile in the core comes back as a RequestError plus an abort, without disturbing the other requests."""

from __future__ import annotations

import re

import pytest

from ipc.messages import EngineRequest, FinishReason, SamplingParams, StructuredOutputsParams
from tests.core.engine_utils import make_engine, run_engine
from tests.frontend.model_files import tiny_llama_dir

REGEX = r"(cat|dog)s? [0-9]{2,4}"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama-structured"))


def _decode(model, tokens):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model).decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_regex_holds_and_async_matches_sync(model, async_scheduling):
    constrained = SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=24,
                                 structured_outputs=StructuredOutputsParams(regex=REGEX))
    free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine = make_engine(model, async_scheduling=async_scheduling)
    results = run_engine(engine, [[1, 2, 3, 4], [5, 6, 7]], [constrained, free])
    for index in range(2):
        r = results[(0, index)]
        assert r["finish_reason"] == FinishReason.STOP
        assert re.fullmatch(REGEX, _decode(model, r["tokens"])), _decode(model, r["tokens"])
    assert len(results[(1, 0)]["tokens"]) == 8
    reference = run_engine(make_engine(model, async_scheduling=False), [[1, 2, 3, 4], [5, 6, 7]], [constrained, free])
    assert {k: v["tokens"] for k, v in results.items()} == {k: v["tokens"] for k, v in reference.items()}


def test_grammar_failing_in_the_core_is_a_request_error(model):
    engine = make_engine(model)
    bad = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(grammar="root ::= undefined_rule"))
    engine.add_request(EngineRequest("bad", [1, 2, 3], bad))
    engine.add_request(EngineRequest("good", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4,
                                                                       ignore_eos=True)))
    errors, finished = [], {}
    while engine.has_work():
        step = engine.step()
        errors.extend(step.errors)
        for out in step.outputs:
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert [(e.request_id, e.param) for e in errors] == [("bad", "structured_outputs")]
    assert "undefined_rule" in errors[0].message
    assert finished == {"bad": FinishReason.ABORT, "good": FinishReason.LENGTH}
    assert not engine.structured._matchers and not engine.structured._compiling


@pytest.mark.parametrize("overlap_outputs", [False, True])  # True: step() returns with the next step in flight
def test_structured_outputs_with_speculation_verify_without_drafts(model, overlap_outputs):
    """With speculation on, constrained sequences get no drafts (a mask per drafted position would need the matcher
    advanced through the drafts): they verify as one plain row each, the grammar mask on that row, while the free
    sequences around them (several verify rows each) keep speculating. Drafts come from an oracle (the free
    sequences' own greedy continuations) so every step has them. Same tokens as without speculation, the regex
    holds, and no constrained sequence ever carried a draft."""
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    constrained = SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=24,
                                 structured_outputs=StructuredOutputsParams(regex=REGEX))
    # Free sequences before and after the constrained ones: their verify rows shift the constrained rows off their
    # sequence indices.
    prompts = [[11, 12, 13, 14, 15], [1, 2, 3, 4], [21, 22, 23]]
    params = [free, constrained, free]
    reference = run_engine(make_engine(model), prompts, params)

    engine = make_engine(model, speculative_config=ngram, async_scheduling=overlap_outputs)
    assert engine.overlap_outputs is overlap_outputs
    proposed_for: list[bool] = []

    def oracle(seqs):
        proposed_for.extend(s.sampling_params.structured_outputs is not None for s in seqs)
        drafts = []
        for s in seqs:
            future = reference[(int(s.request_id), s.index)]["tokens"][len(s.output_token_ids):]
            drafts.append(future[:2] + [7] if len(future) > 3 else [])  # two right, then one to reject
        return drafts

    engine.proposer.propose = oracle
    run_engine(engine, [[9, 9]], constrained)  # compiles the grammar: below, every sequence decodes side by side
    got = run_engine(engine, prompts, params)
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
    for index in range(2):
        text = _decode(model, got[(1, index)]["tokens"])
        assert got[(1, index)]["finish_reason"] == FinishReason.STOP
        assert re.fullmatch(REGEX, text), text
    assert proposed_for and not any(proposed_for)  # the free sequences were proposed for, never a constrained one
    stats = engine.get_stats()
    assert stats["spec_num_accepted_tokens"] > 0  # verify steps with several rows per free sequence
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1
