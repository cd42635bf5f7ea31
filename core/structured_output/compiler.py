"""Compile structured-output constraints to xgrammar grammars off the engine's critical path, cached by their text.

One worker thread owns the compiler (xgrammar parallelises a compile internally); the first job also builds the
``TokenizerInfo`` (it reads the whole vocabulary), so a server that never sees a constrained request pays nothing.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ipc.messages import StructuredOutputsParams

logger = logging.getLogger(__name__)

_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:.]+\] \S+?:\d+: ")


def xgrammar_message(exc: Exception) -> str:
    """xgrammar's error text without its '[time] file.cc:line: ' prefix."""
    return _XGRAMMAR_LOCATION.sub("", str(exc).strip())


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices``."""
    def literal(text: str) -> str:
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        return f'"{escaped}"'
    return "root ::= " + " | ".join(literal(c) for c in choices)


# ``json_object``: any JSON object, compact as ``json.dumps`` writes it (", " and ": " between items, no other
# whitespace): the language of ``compile_json_schema('{"type": "object"}', any_whitespace=False)``, written in the
# shape of xgrammar's built-in JSON grammar (a string rule that ends with the separator after it, lookahead
# assertions after each value), whose masks xgrammar fills about twice as fast (2.5 against 4.8 us a row on the dev
# box over 7,300 rows of a random walk, every mask identical: tests/core/test_structured_output_json_object.py).
JSON_OBJECT_GRAMMAR = "\n".join((
    r'root ::= "{" members_and_embrace',
    r'value_non_str ::= ("{" members_and_embrace | "[" elements_or_embrace | "0" fraction exponent'
    r' | [1-9] [0-9]* fraction exponent | "-" [0-9] fraction exponent | "-" [1-9] [0-9]* fraction exponent'
    r' | "true" | "false" | "null") (=(member_suffix_suffix))',
    r'members_and_embrace ::= ("\"" characters_and_colon members_suffix | "}") (=([,}\]]))',
    r'members_suffix ::= (value_non_str member_suffix_suffix | "\"" characters_and_embrace'
    r' | "\"" characters_and_comma "\"" characters_and_colon members_suffix) (=([,}\]]))',
    r'member_suffix_suffix ::= ("}" | ", " "\"" characters_and_colon members_suffix) (=([,}\]]))',
    r'elements_or_embrace ::= ("{" members_and_embrace elements_rest "]"'
    r' | "[" elements_or_embrace elements_rest "]" | "\"" characters_item elements_rest "]"'
    r' | "0" fraction exponent elements_rest "]" | [1-9] [0-9]* fraction exponent elements_rest "]"'
    r' | "-" "0" fraction exponent elements_rest "]"'
    r' | "-" [1-9] [0-9]* fraction exponent elements_rest "]" | "true" elements_rest "]"'
    r' | "false" elements_rest "]" | "null" elements_rest "]" | "]")',
    r'elements ::= ("{" members_and_embrace elements_rest | "[" elements_or_embrace elements_rest'
    r' | "\"" characters_item elements_rest | "0" fraction exponent elements_rest'
    r' | [1-9] [0-9]* fraction exponent elements_rest | "-" [0-9] fraction exponent elements_rest'
    r' | "-" [1-9] [0-9]* fraction exponent elements_rest | "true" elements_rest | "false" elements_rest'
    r' | "null" elements_rest)',
    r'elements_rest ::= "" | ", " elements',
    r'characters_and_colon ::= ("\"" ": " | [^"\\\0-\x1f] characters_and_colon'
    r' | "\\" escape characters_and_colon) (=([\"{[0-9tfn\-]))',
    r'characters_and_comma ::= ("\"" ", " | [^"\\\0-\x1f] characters_and_comma'
    r' | "\\" escape characters_and_comma) (=("\""))',
    r'characters_and_embrace ::= ("\"" "}" | [^"\\\0-\x1f] characters_and_embrace'
    r' | "\\" escape characters_and_embrace) (=([},\]]))',
    r'characters_item ::= ("\"" | [^"\\\0-\x1f] characters_item | "\\" escape characters_item) (=([,\]]))',
    r'escape ::= [\"\\/bfnrt] | "u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9]',
    r'fraction ::= "" | "." [0-9] [0-9]*',
    r'exponent ::= "" | "e" sign [0-9] [0-9]* | "E" sign [0-9] [0-9]*',
    r'sign ::= "" | "+" | "-"',
))


def compile_constraint(compiler: Any, params: StructuredOutputsParams) -> Any:
    """``params`` as an xgrammar ``CompiledGrammar``. JSON comes out compact (no free whitespace): small models
    otherwise spend their token budget on newlines."""
    if params.json is not None:
        return compiler.compile_json_schema(params.json, any_whitespace=False)
    if params.json_object:
        return compiler.compile_grammar(JSON_OBJECT_GRAMMAR)
    if params.regex is not None:
        return compiler.compile_regex(params.regex)
    if params.choice is not None:
        return compiler.compile_grammar(choice_grammar(params.choice))
    return compiler.compile_grammar(params.grammar)


class GrammarCompilerService:
    """``submit(params)`` -> a future of the compiled grammar; equal constraints share one future (and compile)."""

    def __init__(self, load_tokenizer_info: Callable[[], Any], max_cached: int = 1024) -> None:
        self._load_tokenizer_info = load_tokenizer_info
        self._compiler: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._cache: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()
        self._max_cached = max_cached

    def submit(self, params: StructuredOutputsParams) -> Future:
        key = params.key
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                if len(self._cache) >= self._max_cached:
                    self._cache.pop(next(iter(self._cache)))  # oldest first
                future = self._cache[key] = self._pool.submit(self._compile, params)
            return future

    def _compile(self, params: StructuredOutputsParams) -> Any:
        import xgrammar as xgr

        if self._compiler is None:
            self._compiler = xgr.GrammarCompiler(self._load_tokenizer_info())
        try:
            return compile_constraint(self._compiler, params)
        except Exception as exc:
            with self._lock:
                self._cache.pop(params.key, None)  # do not cache failures
            raise ValueError(f"Invalid structured output ({params.key[0]}): {xgrammar_message(exc)}") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
