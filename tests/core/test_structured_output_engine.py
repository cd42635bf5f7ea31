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
