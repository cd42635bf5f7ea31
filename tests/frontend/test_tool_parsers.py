"""Tool-call parsers on canned model outputs, and the streamer's deltas reassembling to the full parse."""

from __future__ import annotations

import json

import pytest

from frontend.protocol import OpenAIError
from frontend.tool_calling import ToolPlan, plan_tool_calls
from frontend.tool_parsers import TOOL_PARSERS

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

CANNED = {
    "hermes": 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "mistral": 'Let me check.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    "pythonic": '[get_weather(city="Paris")]',
}


@pytest.mark.parametrize("name", sorted(CANNED))
def test_parser_extracts_call(name):
    content, calls = TOOL_PARSERS[name]().extract(CANNED[name])
    assert calls == [("get_weather", json.dumps({"city": "Paris"}))]
    assert content == ("Let me check." if name in ("hermes", "mistral") else None)


@pytest.mark.parametrize("name", sorted(CANNED))
def test_plain_text_is_content(name):
    assert TOOL_PARSERS[name]().extract("The weather is nice.") == ("The weather is nice.", [])


class _Req:
    def __init__(self, tools, tool_choice, parallel_tool_calls=None):
        self.tools, self.tool_choice, self.parallel_tool_calls = tools, tool_choice, parallel_tool_calls


@pytest.mark.parametrize("name", sorted(CANNED))
def test_streamed_deltas_reassemble_to_the_parse(name):
    plan = plan_tool_calls(_Req([WEATHER], "auto"), True, name)
    text = CANNED[name]
    streamer = plan.streamer()
    content, calls = "", {}
    for i in range(0, len(text), 3):
        piece = text[i:i + 3]
        delta_content, deltas = streamer.feed(piece, i + 3 >= len(text))
        content += delta_content or ""
        for d in deltas:
            call = calls.setdefault(d["index"], {"name": "", "arguments": ""})
            call["name"] += d.get("function", {}).get("name", "")
            call["arguments"] += d["function"]["arguments"]
    expected_content, expected_calls = plan.extract(text)
    assert content == (expected_content or "")
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in expected_calls]


def test_plan_errors():
    with pytest.raises(OpenAIError, match="not in tools"):
        plan_tool_calls(_Req([WEATHER], {"type": "function", "function": {"name": "nope"}}), False, None)
    with pytest.raises(OpenAIError, match="enable-auto-tool-choice"):
        plan_tool_calls(_Req([WEATHER], "auto"), False, None)
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}
    with pytest.raises(OpenAIError, match="Unsupported type"):
        plan_tool_calls(_Req([bad], "required"), False, None)
    assert plan_tool_calls(_Req([WEATHER], "none"), False, None) is None


def test_required_schema_lists_every_function():
    plan: ToolPlan = plan_tool_calls(_Req([WEATHER], "required", parallel_tool_calls=False), False, None)
    from ipc.messages import SamplingParams

    params = SamplingParams()
    plan.apply(params)
    schema = json.loads(params.structured_outputs.json)
    assert schema["maxItems"] == 1 and schema["items"]["properties"]["name"]["enum"] == ["get_weather"]
    content, calls = plan.extract('[{"name": "get_weather", "parameters": {"city": "Rome"}}]')
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
