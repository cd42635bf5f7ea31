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


LONG = 'Paris, "the city of light" {not a brace} \\ and ünïcode ' * 4
LONG_ARGS = json.dumps({"city": LONG, "days": [1, 2, {"x": None}]}, ensure_ascii=False)
TWO_CALLS = {
    "hermes": f'Sure.<tool_call>\n{{"name": "get_weather", "arguments": {LONG_ARGS}}}\n</tool_call>\n'
              '<tool_call>\n{"arguments": {"city": "Rome"}, "name": "get_time"}\n</tool_call>',
    "llama3_json": f'<|python_tag|>{{"name": "get_weather", "parameters": {LONG_ARGS}}}; '
                   '{"name": "get_time", "parameters": {"city": "Rome"}}',
    "mistral": f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {LONG_ARGS}}}, '
               '{"name": "get_time", "arguments": {"city":"Rome"}}]',
    "pythonic": f'[get_weather(city={LONG!r}, days=[1, 2, {{"x": None}}]), get_time(city="Rome")]',
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def stream(plan, text: str, piece_sizes=(1, 2, 3, 5, 7)):
    """Feed ``text`` in pieces of varying size; returns (content, calls by index, argument deltas by index, the
    delta events in order)."""
    streamer = plan.streamer()
    content, calls, pieces, events = "", {}, {}, []
    i, k = 0, 0
    while i < len(text):
        n = piece_sizes[k % len(piece_sizes)]
        k += 1
        delta_content, deltas = streamer.feed(text[i:i + n], i + n >= len(text))
        i += n
        content += delta_content or ""
        for d in deltas:
            events.append(d)
            if "id" in d:
                assert d["index"] not in calls, "one header per call"
                calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
            else:
                assert d["index"] in calls, "arguments arrive after their call's header"
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
                pieces[d["index"]] = pieces.get(d["index"], 0) + 1
    return content, calls, pieces, streamer


@pytest.mark.parametrize("name", sorted(TWO_CALLS))
def test_tool_calls_stream_incrementally_and_reassemble_to_the_parse(name):
    plan = plan_tool_calls(_Req([WEATHER, TIME], "auto"), True, name)
    text = TWO_CALLS[name]
    expected_content, expected = plan.extract(text)
    assert [c["function"]["name"] for c in expected] == ["get_weather", "get_time"]
    assert json.loads(expected[0]["function"]["arguments"]) == json.loads(LONG_ARGS)
    content, calls, pieces, streamer = stream(plan, text)
    assert content == (expected_content or "")
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in expected]
    assert pieces[0] > 10  # the long arguments arrive in many pieces, not in one at the end
    assert [c["id"] for c in streamer.calls] == [c["id"] for c in calls.values()]


def test_required_tool_calls_stream_incrementally():
    plan = plan_tool_calls(_Req([WEATHER, TIME], "required"), False, None)
    text = f'[{{"name": "get_weather", "parameters": {LONG_ARGS}}}, {{"name": "get_time", "parameters": {{}}}}]'
    content, expected = plan.extract(text)
    assert content is None and expected[0]["function"]["arguments"] == LONG_ARGS
    _, calls, pieces, _ = stream(plan, text)
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [("get_weather", LONG_ARGS), ("get_time", "{}")]
    assert pieces[0] > 10


def test_the_name_comes_before_any_argument_even_when_written_after_them():
    plan = plan_tool_calls(_Req([TIME], "auto"), True, "hermes")
    _, calls, _, _ = stream(plan, '<tool_call>{"arguments": {"city": "Rome"}, "name": "get_time"}</tool_call>')
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_time", '{"city": "Rome"}')]


def test_a_malformed_call_is_content_after_all():
    plan = plan_tool_calls(_Req([TIME], "auto"), True, "hermes")
    text = '<tool_call>{"name": "get_time", "arguments": {"city": }</tool_call>'
    assert plan.extract(text) == (text, [])
    content, _, _, streamer = stream(plan, text)
    assert content == text and streamer.calls == []
