"""Parsers that find tool calls in a model's text (``--tool-call-parser``), with vLLM's names and formats.

Each parser answers three questions: where in the text a tool call starts (``tool_start``; text before it is
ordinary content, streamed as it comes), on the finished text, which calls it holds (``extract``), and how to follow
calls while they are generated (``call_scanner``, frontend/tool_call_streaming.py: names first, arguments in pieces
that add up to what ``extract`` returns).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from frontend.tool_call_streaming import JsonCallScanner, PythonicCallScanner, json_calls


class ToolParseError(ValueError):
    pass


def _arguments_json(value: Any) -> str:
    """Arguments as OpenAI sends them: a JSON object in a string."""
    if isinstance(value, str):
        return value
    return json.dumps(value if value is not None else {}, ensure_ascii=False)


def _call(obj: Any, args_keys: tuple[str, ...]) -> tuple[str, str]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ToolParseError(f"not a tool call: {obj!r}")
    args = next((obj[k] for k in args_keys if k in obj), {})
    return obj["name"], _arguments_json(args)


class ToolParser:
    """``markers``: strings that open a tool call anywhere in the text."""

    name = ""
    markers: tuple[str, ...] = ()
    special_markers = False  # markers are special tokens: generate with skip_special_tokens=False

    def tool_start(self, text: str) -> int | None:
        """Index where the first tool call starts, or None."""
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def hold_back(self, text: str) -> int:
        """How many trailing characters might be the beginning of a marker (not streamed yet)."""
        for n in range(min(len(text), max(map(len, self.markers))), 0, -1):
            if any(m.startswith(text[-n:]) for m in self.markers):
                return n
        return 0

    def extract(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        """(content, [(name, arguments JSON)]); no calls -> (text, []). A malformed call leaves the text as content."""
        start = self.tool_start(text)
        if start is None:
            return text, []
        try:
            calls = self._parse(text[start:])
        except (ToolParseError, ValueError, SyntaxError):
            return text, []
        content = text[:start]
        return (content if content.strip() else None), calls

    def _parse(self, text: str) -> list[tuple[str, str]]:
        raise NotImplementedError

    def call_scanner(self) -> JsonCallScanner | PythonicCallScanner:
        """Follows the calls in the text from ``tool_start`` on, fed as it is generated."""
        return JsonCallScanner(("arguments", "parameters"))


def _checked_json_calls(text: str, num_calls: int, args_keys: tuple[str, ...]) -> list[tuple[str, str]]:
    """The calls as the stream's scanner reads them (arguments as written), after ``json.loads`` found
    ``num_calls`` well-formed ones."""
    calls = json_calls(text, args_keys)
    if len(calls) != num_calls:
        raise ToolParseError(f"found {len(calls)} call objects, expected {num_calls}")
    return calls


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, repeated (Hermes, Qwen)."""

    name = "hermes"
    markers = ("<tool_call>",)
    special_markers = True
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def _parse(self, text: str) -> list[tuple[str, str]]:
        calls = [_call(json.loads(body), ("arguments", "parameters")) for body in self._CALL.findall(text)]
        if not calls:
            raise ToolParseError("no tool call")
        return _checked_json_calls(text, len(calls), ("arguments", "parameters"))


class MistralToolParser(ToolParser):
    """``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    special_markers = True

    def _parse(self, text: str) -> list[tuple[str, str]]:
        body = json.loads(text[len("[TOOL_CALLS]"):].strip())
        calls = [_call(obj, ("arguments", "parameters")) for obj in (body if isinstance(body, list) else [body])]
        return _checked_json_calls(text, len(calls), ("arguments", "parameters"))


class _WholeTextParser(ToolParser):
    """Formats where the whole reply (after leading whitespace) is the tool call."""

    openers: tuple[str, ...] = ()

    def tool_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if any(stripped.startswith(o) for o in self.openers):
            return len(text) - len(stripped)
        return None

    def hold_back(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or any(o.startswith(stripped) for o in self.openers):
            return len(text)  # still could become a tool call
        return 0


class Llama3JsonToolParser(_WholeTextParser):
    """``{"name": ..., "parameters": {...}}`` (optionally after ``<|python_tag|>``), several joined by ``;``."""

    name = "llama3_json"
    openers = ("{", "<|python_tag|>")

    def _parse(self, text: str) -> list[tuple[str, str]]:
        text = text.strip().removeprefix("<|python_tag|>").strip()
        decoder = json.JSONDecoder()
        calls, pos = [], 0
        while pos < len(text):
            obj, end = decoder.raw_decode(text, pos)
            calls.append(_call(obj, ("parameters", "arguments")))
            pos = end
            while pos < len(text) and text[pos] in " \n\t;":
                pos += 1
        return _checked_json_calls(text, len(calls), ("parameters", "arguments"))

    def call_scanner(self) -> JsonCallScanner:
        return JsonCallScanner(("parameters", "arguments"))


class PythonicToolParser(_WholeTextParser):
    """``[get_weather(city="Paris"), other(x=1)]`` (Llama 3.2 / 4 pythonic)."""

    name = "pythonic"
    openers = ("[",)

    def _parse(self, text: str) -> list[tuple[str, str]]:
        tree = ast.parse(text.strip(), mode="eval").body
        if not isinstance(tree, ast.List):
            raise ToolParseError("not a list of calls")
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                raise ToolParseError("tool calls take keyword arguments only")
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            calls.append((node.func.id, _arguments_json(args)))
        return calls

    def call_scanner(self) -> PythonicCallScanner:
        return PythonicCallScanner()


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}
