"""Tool calls as they are generated: each call's name as soon as it is complete, then its arguments in pieces.

OpenAI (and vLLM) stream a tool call as deltas: first ``{"index", "id", "type", "function": {"name", "arguments":
""}}``, then ``{"index", "function": {"arguments": <next piece>}}`` as the model writes them; the pieces
concatenate to the call's ``arguments``. The scanners here read the model's text incrementally (each character
once) and report, for every call found so far, its name (once its string is closed) and the arguments text known so
far, which is always a prefix of the final ``arguments``:

- ``JsonCallScanner``: calls written as JSON objects ``{"name": ..., "arguments" | "parameters": {...}}`` (hermes,
  mistral, llama3_json, and ``tool_choice="required"``'s array). The arguments are the raw text of the value, so
  the non-streamed parse (``json_calls``) gives the same string.
- ``PythonicCallScanner``: ``[f(a=1, b="x"), g()]``. The arguments are ``json.dumps`` of the keyword arguments;
  each keyword's piece is sent once the next keyword (or the call's end) shows it is complete.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# States inside a call object, at its top level.
_EXPECT_KEY, _IN_KEY, _EXPECT_COLON, _EXPECT_VALUE, _IN_VALUE, _AFTER_VALUE = range(6)


@dataclass
class ScannedCall:
    name: str | None = None
    arguments: str = ""  # known so far (a prefix of the final arguments)
    complete: bool = False  # the call's text has ended


class JsonCallScanner:
    """Finds JSON call objects in text fed piece by piece. Text outside objects (markers, ``[``, ``,``, ``;``) is
    skipped; inside an object, strings, escapes and nesting are tracked so that only its top-level keys count."""

    def __init__(self, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> None:
        self.args_keys = args_keys
        self.text = ""
        self.calls: list[ScannedCall] = []
        self._depth = 0  # 0: between call objects; 1: at a call object's top level
        self._in_string = False
        self._escape = False
        self._state = _EXPECT_KEY
        self._key: str | None = None
        self._start = 0  # where the current key or value starts
        self._args_start: int | None = None  # the current call's arguments value (a container) starts here
        self._args_is_container = False

    def feed(self, piece: str) -> list[ScannedCall]:
        base = len(self.text)
        self.text += piece
        for offset, c in enumerate(piece):
            self._step(base + offset, c)
        if self._args_start is not None and self._args_is_container and self.calls:
            self.calls[-1].arguments = self.text[self._args_start:]
        return self.calls

    def _step(self, i: int, c: str) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._in_string = False
                if self._depth == 1:
                    if self._state == _IN_KEY:
                        self._key = _loads(self.text[self._start:i + 1])
                        self._state = _EXPECT_COLON
                    elif self._state == _IN_VALUE:
                        self._value_done(i + 1)
            return
        depth = self._depth
        if depth == 0:
            if c == "{":
                self._depth = 1
                self._state = _EXPECT_KEY
                self.calls.append(ScannedCall())
            return
        if c == '"':
            self._in_string = True
            if depth == 1:
                if self._state == _EXPECT_KEY:
                    self._start, self._state = i, _IN_KEY
                elif self._state == _EXPECT_VALUE:
                    self._start, self._state = i, _IN_VALUE
            return
        if depth == 1:
            state = self._state
            if state == _EXPECT_VALUE and not c.isspace():
                self._start, self._state = i, _IN_VALUE
                if c in "{[":
                    self._depth = 2
                    if self._key in self.args_keys:
                        self._args_start, self._args_is_container = i, True
                return
            if state == _IN_VALUE and c in ",}":  # the end of a number or literal
                self._value_done(i)
                state = self._state
            if c == ":" and state == _EXPECT_COLON:
                self._state = _EXPECT_VALUE
            elif c == ",":
                self._state = _EXPECT_KEY
            elif c == "}":
                self._depth = 0
                self.calls[-1].complete = True
            return
        if c in "{[":
            self._depth += 1
        elif c in "}]":
            self._depth -= 1
            if self._depth == 1 and self._state == _IN_VALUE:
                self._value_done(i + 1)

    def _value_done(self, end: int) -> None:
        raw = self.text[self._start:end].strip()
        call = self.calls[-1]
        if self._key == "name":
            name = _loads(raw)
            call.name = name if isinstance(name, str) else None
        elif self._key in self.args_keys:
            call.arguments = arguments_text(raw)
            self._args_start, self._args_is_container = None, False
        self._state = _AFTER_VALUE


def arguments_text(raw: str) -> str:
    """A call's ``arguments`` string from the raw JSON of its value: the text itself for an object (as written,
    so that streamed pieces add up to it), the decoded string for a string (some models quote the object)."""
    if raw.startswith("{") or raw.startswith("["):
        return raw
    value = _loads(raw)
    if isinstance(value, str):
        return value
    return json.dumps(value if value is not None else {}, ensure_ascii=False)


def json_calls(text: str, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> list[tuple[str, str]]:
    """The complete calls in ``text`` as (name, arguments), from the same scanner as the stream; raises
    ``ValueError`` when a call has no name or is cut short."""
    scanner = JsonCallScanner(args_keys)
    calls = scanner.feed(text)
    if not calls or any(c.name is None or not c.complete for c in calls):
        raise ValueError("a tool call without a name, or cut short")
    return [(c.name, c.arguments or "{}") for c in calls]


class PythonicCallScanner:
    """``[f(a=1, b="x"), g()]`` fed piece by piece: a call's name once its ``(`` arrives, then its arguments as
    ``json.dumps`` of the keyword arguments, a keyword at a time."""

    def __init__(self) -> None:
        self.text = ""
        self.calls: list[ScannedCall] = []

    def feed(self, piece: str) -> list[ScannedCall]:
        self.text += piece
        body = self.text.strip()
        if not body.startswith("["):
            return self.calls
        closed, open_string_in_call = _close_pythonic(body)
        if closed is None:
            return self.calls
        calls = closed.elts
        for i, node in enumerate(calls):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                break
            done = i < len(calls) - 1 or _call_closed(body, node)
            # The last keyword may still grow: left out, unless it is a string being written (its text so far is
            # a prefix of its JSON, less the closing quote).
            growing_string = (not done and open_string_in_call and node.keywords
                              and isinstance(node.keywords[-1].value, ast.Constant)
                              and isinstance(node.keywords[-1].value.value, str))
            keywords = node.keywords if done or growing_string else node.keywords[:-1]
            try:
                kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in keywords}
            except ValueError:
                break
            arguments = json.dumps(kwargs, ensure_ascii=False)
            if growing_string:
                arguments = arguments[:-2]  # without the string's closing quote and the closing brace
            elif not done:
                arguments = arguments[:-1]  # without the closing brace: more keywords may follow
            if i == len(self.calls):
                self.calls.append(ScannedCall(node.func.id))
            call = self.calls[i]
            if len(arguments) > len(call.arguments):
                call.arguments = arguments
            call.complete = done
        return self.calls


def _close_pythonic(body: str) -> tuple[ast.List | None, bool]:
    """The partial list of calls, parsed after closing the open string and brackets (None when that does not
    parse yet, e.g. ``f(a=``), and whether a string is open directly inside a call's parentheses."""
    quote, escape, stack = "", False, []
    for c in body:
        if quote:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "([{":
            stack.append(c)
        elif c in ")]}" and stack:
            stack.pop()
    closing = quote + "".join({"(": ")", "[": "]", "{": "}"}[c] for c in reversed(stack))
    try:
        tree = ast.parse(body + closing, mode="eval").body
    except SyntaxError:
        return None, False
    return (tree if isinstance(tree, ast.List) else None), bool(quote) and stack[-1:] == ["("]


def _call_closed(body: str, node: ast.Call) -> bool:
    """Whether the last call's ``)`` is in the text (not supplied by the closing suffix). Offsets are in bytes."""
    end = getattr(node, "end_col_offset", None)
    lines = body.splitlines()
    if end is None or node.end_lineno is None or node.end_lineno > len(lines):
        return False
    return end <= len(lines[node.end_lineno - 1].encode())


def _loads(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


class CallDeltas:
    """What of each call was already streamed, and OpenAI's ``tool_calls`` deltas for what is new."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self.new_id = new_id
        self.sent: list[tuple[str, str]] = []  # per call: (its id, the arguments text sent)

    def deltas(self, calls: list[ScannedCall]) -> list[dict[str, Any]]:
        """Deltas for the scanned calls: a header per call whose name is known, then its new arguments text."""
        out: list[dict[str, Any]] = []
        for i, call in enumerate(calls):
            if call.name is None:
                break  # calls stream in order: a later one waits for this one's name
            out.extend(self._advance(i, call.name, call.arguments))
        return out

    def finish(self, final_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The last deltas, so that each call's pieces add up to ``final_calls`` (the parse of the whole text);
        each final call takes the id its header was streamed with."""
        out: list[dict[str, Any]] = []
        for i, call in enumerate(final_calls):
            fn = call["function"]
            out.extend(self._advance(i, fn["name"], fn["arguments"]))
            call["id"] = self.sent[i][0]
        return out

    def _advance(self, i: int, name: str, arguments: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if i == len(self.sent):
            self.sent.append((self.new_id(), ""))
            out.append({"index": i, "id": self.sent[i][0], "type": "function",
                        "function": {"name": name, "arguments": ""}})
        call_id, sent = self.sent[i]
        if len(arguments) > len(sent) and arguments.startswith(sent):
            out.append({"index": i, "function": {"arguments": arguments[len(sent):]}})
            self.sent[i] = (call_id, arguments)
        return out
