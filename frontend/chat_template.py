"""Chat templates rendered in jinja2's sandbox with bounded output, bounded time, and off the event loop.

A template is code: a request-supplied one (only with ``--trust-request-chat-template``) or a hostile model's
could build a 50 MB string or loop for minutes. The environment mirrors transformers' (trim/lstrip blocks,
loopcontrols, ``tojson``, ``raise_exception``, ``strftime_now``, the ``generation`` tag) so the model's own
templates render as ``apply_chat_template`` does, and adds limits:

- string/list repetition and ``**`` are checked before they allocate; an integer argument above the output limit
  to any call (``range``, ``center``, ...) is refused;
- a line tracer (installed only in the rendering thread, active only in template frames) stops the render once
  its time is up, which also catches pure loops that call nothing;
- the output is streamed and refused once it passes the limit.
"""

from __future__ import annotations

import json
import functools
import math
import sys
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TIME_LIMIT_S = 2.0
DEFAULT_MAX_OUTPUT_CHARS = 10_000_000
_MAX_POWER_BITS = 4096


class TemplateLimitError(ValueError):
    """The template went over its output-size or time limit (an HTTP 400)."""


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (assistant-token masks): here it just renders."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, max_output_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=[jinja2.ext.loopcontrols, _GenerationTag])
        self.max_output_chars = max_output_chars
        self.filters["tojson"] = _tojson
        # Filters are called directly by the compiled template, not through ``call``: bound their int arguments
        # too, so ``'a'|center(10**9)`` is refused before it allocates a gigabyte.
        self.filters = {name: _bounded(f, max_output_chars) for name, f in self.filters.items()}
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) \
                        and len(seq) * times > self.max_output_chars:
                    raise TemplateLimitError(f"The chat template builds a value over {self.max_output_chars} "
                                             "characters.")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                and right * math.log2(abs(left)) > _MAX_POWER_BITS:
            raise TemplateLimitError("The chat template computes a number too large.")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's API)
        _check_call_args(args, kwargs, __self.max_output_chars)
        return super().call(__context, __obj, *args, **kwargs)


def _check_call_args(args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            raise TemplateLimitError(f"The chat template passes {value} to a call (limit {limit}).")


def _bounded(jinja_filter: Any, limit: int) -> Any:
    """``jinja_filter`` refusing int arguments over ``limit``; ``wraps`` keeps jinja's pass_context markers."""

    @functools.wraps(jinja_filter)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_call_args(args, kwargs, limit)
        return jinja_filter(*args, **kwargs)

    return bounded


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=32)
def _compile(source: str, max_output_chars: int) -> jinja2.Template:
    return _LimitedSandbox(max_output_chars).from_string(source)


def render_chat_template(source: str, conversation: list[dict[str, Any]], *, add_generation_prompt: bool,
                         continue_final_message: bool, special_tokens: dict[str, Any],
                         extra: dict[str, Any] | None = None, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                         max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS) -> str:
    """Render ``source`` for ``conversation``; blocking (call it from a worker thread).

    Raises ``TemplateLimitError`` past the limits, jinja2's errors for a broken template.
    """
    template = _compile(source, max_output_chars)
    variables = {**special_tokens, **(extra or {}), "messages": conversation,
                 "add_generation_prompt": add_generation_prompt}
    deadline = time.monotonic() + time_limit_s

    def trace_template_lines(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"The chat template took longer than {time_limit_s:g} s to render.")
        return trace_template_lines

    def trace_calls(frame: Any, event: str, arg: Any) -> Any:
        return trace_template_lines if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(trace_calls)
    try:
        chunks, size = [], 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > max_output_chars:
                raise TemplateLimitError(f"The chat template's output is over {max_output_chars} characters.")
            chunks.append(chunk)
    finally:
        sys.settrace(previous)
    rendered = "".join(chunks)
    if continue_final_message and conversation:
        final = str(conversation[-1].get("content") or "").strip()
        if final not in rendered:
            raise ValueError("continue_final_message is set but the final message does not appear in the chat "
                             "after applying the chat template.")
        rendered = rendered[: rendered.rindex(final) + len(final)]
    return rendered


def special_tokens_of(tokenizer: Any) -> dict[str, Any]:
    """The template variables transformers passes from the tokenizer: bos_token, eos_token, ..."""
    tokens = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    return {k: v for k, v in tokens.items() if isinstance(v, str)}
