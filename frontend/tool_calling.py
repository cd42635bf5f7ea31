"""OpenAI tool calling for chat completions: ``tools`` + ``tool_choice`` -> a plan for the request.

- ``none`` (or no tools): nothing changes; the tools are not shown to the model.
- ``auto``: the model sees the tools through the chat template and its text is parsed by ``--tool-call-parser``.
- ``required`` / a named function: the output is forced by a grammar built from the functions' parameter schemas
  (required: a JSON array of ``{"name", "parameters"}``; named: the function's arguments object itself).

Streaming: every call streams as it is generated, OpenAI's way: a header with the id and name, then the arguments
in pieces (frontend/tool_call_streaming.py); the pieces add up to the non-streamed call's arguments.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from frontend.protocol import OpenAIError
from frontend.structured_outputs import validate_structured_outputs
from frontend.tool_call_streaming import CallDeltas, JsonCallScanner, PythonicCallScanner, json_calls
from frontend.tool_parsers import TOOL_PARSERS, ToolParser
from ipc.messages import SamplingParams, StructuredOutputsParams


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": tool_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass
class ToolPlan:
    mode: str  # auto | required | named
    functions: dict[str, dict[str, Any]]  # name -> OpenAI function object
    template_tools: list[dict[str, Any]]
    named: str | None = None
    parser: ToolParser | None = None
    parallel: bool = True

    def apply(self, params: SamplingParams) -> None:
        """Constrain the output for required / named; let a parser see its special tokens."""
        if self.mode in ("required", "named"):
            if params.structured_outputs is not None:
                raise OpenAIError(f"tool_choice={self.mode!r} cannot be combined with another structured-output "
                                  "constraint (response_format, structured_outputs, guided_*).", param="tool_choice")
            params.structured_outputs = StructuredOutputsParams(json=json.dumps(self._schema()))
        elif self.parser is not None and self.parser.special_markers:
            params.skip_special_tokens = False

    def _schema(self) -> dict[str, Any]:
        if self.mode == "named":
            return _parameters(self.functions[self.named])
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                   "parameters": _parameters(fn)},
                  "required": ["name", "parameters"]} for name, fn in self.functions.items()]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    def extract(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool_calls) of a finished output."""
        if self.mode == "named":
            return None, [tool_call(self.named, text)]
        if self.mode == "required":
            try:  # well-formed (not cut short by max_tokens), then the arguments as written (as streamed)
                calls = json.loads(text)
                if not isinstance(calls, list) or not all(isinstance(c, dict) and "parameters" in c for c in calls):
                    raise ValueError("not a list of calls")
                return None, [tool_call(name, args) for name, args in json_calls(text, ("parameters",))]
            except (ValueError, TypeError, KeyError):  # the text is all there is
                return text, []
        content, calls = self.parser.extract(text)
        return content, [tool_call(name, args) for name, args in calls]

    def streamer(self) -> "ToolCallStreamer":
        return ToolCallStreamer(self)


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def plan_tool_calls(request: Any, enable_auto_tool_choice: bool, tool_call_parser: str | None) -> ToolPlan | None:
    """The request's tool plan (None: no tool calling); 400 for invalid tools or an impossible tool_choice."""
    tools, choice = request.tools, request.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise OpenAIError("tool_choice needs tools.", param="tool_choice")
        return None
    functions = _check_tools(tools)
    if choice is None:
        choice = "auto"
    if choice == "none":
        return None
    template_tools = [{"type": "function", "function": fn} for fn in functions.values()]
    parallel = request.parallel_tool_calls is not False
    if choice == "auto":
        if not enable_auto_tool_choice or tool_call_parser is None:
            raise OpenAIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                              "set on the server (or send tool_choice 'none', 'required' or a named function).",
                              param="tool_choice")
        return ToolPlan("auto", functions, template_tools, parser=TOOL_PARSERS[tool_call_parser](),
                        parallel=parallel)
    if choice == "required":
        return ToolPlan("required", functions, template_tools, parallel=parallel)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise OpenAIError(f"tool_choice names function {name!r}, which is not in tools "
                              f"({sorted(functions)}).", param="tool_choice")
        return ToolPlan("named", functions, template_tools, named=name, parallel=parallel)
    raise OpenAIError("tool_choice must be 'none', 'auto', 'required' or "
                      '{"type": "function", "function": {"name": ...}}.', param="tool_choice")


def _check_tools(tools: list[Any]) -> dict[str, dict[str, Any]]:
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise OpenAIError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}.", param="tools")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise OpenAIError(f"tools[{i}].function.name must be a non-empty string.", param="tools")
        if name in functions:
            raise OpenAIError(f"tools has two functions named {name!r}.", param="tools")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise OpenAIError(f"tools[{i}].function.parameters must be a JSON schema object.", param="tools")
            try:
                validate_structured_outputs(StructuredOutputsParams(json=params), "tools")
            except OpenAIError as exc:
                raise OpenAIError(f"tools[{i}] ({name}): {exc.message}", param="tools") from None
        functions[name] = fn
    return functions


def template_message(entry: dict[str, Any], message: Any) -> dict[str, Any]:
    """Add a message's tool fields for the chat template: an assistant's ``tool_calls`` (arguments as dicts, as
    templates expect) and a tool reply's ``tool_call_id``."""
    calls = getattr(message, "tool_calls", None)
    if calls:
        converted = []
        for call in calls:
            call = dict(call)
            fn = dict(call.get("function") or {})
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except ValueError:
                    pass
            call["function"] = fn
            converted.append(call)
        entry["tool_calls"] = converted
    call_id = getattr(message, "tool_call_id", None)
    if call_id is not None:
        entry["tool_call_id"] = call_id
    return entry


@dataclass
class ToolCallStreamer:
    """Turns one choice's text deltas into (content delta, tool_call deltas) in OpenAI's streaming shape."""

    plan: ToolPlan
    text: str = ""
    sent: int = 0  # characters of ``text`` already streamed as content
    in_tool: bool = False
    named_started: bool = False
    calls: list[dict[str, Any]] = field(default_factory=list)  # the calls, once the text is complete
    scanner: JsonCallScanner | PythonicCallScanner | None = None
    streamed: CallDeltas = field(default_factory=lambda: CallDeltas(tool_call_id))

    def feed(self, delta: str, finished: bool) -> tuple[str | None, list[dict[str, Any]]]:
        self.text += delta
        plan = self.plan
        if plan.mode == "named":
            out = []
            if not self.named_started:
                self.named_started = True
                call = tool_call(plan.named, "")
                self.calls.append(call)
                out.append({"index": 0, "id": call["id"], "type": "function",
                            "function": {"name": plan.named, "arguments": ""}})
            if delta:
                out.append({"index": 0, "function": {"arguments": delta}})
            return None, out
        if plan.mode == "required":  # the whole text is the JSON array of calls
            if self.scanner is None:
                self.scanner = JsonCallScanner(("parameters",))
            out = self.streamed.deltas(self.scanner.feed(delta))
            if not finished:
                return None, out
            content, calls = plan.extract(self.text)
            return content, out + self._finish(calls)
        # auto: content streams until a tool call starts; from there the parser's scanner follows the calls
        content = ""
        if not self.in_tool:
            start = plan.parser.tool_start(self.text)
            if start is None:
                end = len(self.text) if finished else len(self.text) - plan.parser.hold_back(self.text)
                content = self.text[self.sent:end]
                self.sent = max(self.sent, end)
                return content, []
            self.in_tool = True
            content = self.text[self.sent:start]
            self.sent = start
            self.scanner = plan.parser.call_scanner()
            delta = self.text[start:]
        out = self.streamed.deltas(self.scanner.feed(delta))
        if not finished:
            return content, out
        leftover, calls = plan.parser.extract(self.text[self.sent:])
        if not calls:  # it looked like a call but was not: it is content after all
            return content + (leftover or ""), out
        return content + (leftover or ""), out + self._finish([tool_call(name, args) for name, args in calls])

    def _finish(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rest of every call (all of those the scanner did not see), and the calls for finish_reason."""
        out = self.streamed.finish(calls)
        self.calls.extend(calls)
        return out
