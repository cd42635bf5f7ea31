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


def compile_constraint(compiler: Any, params: StructuredOutputsParams) -> Any:
    """``params`` as an xgrammar ``CompiledGrammar``. JSON comes out compact (no free whitespace): small models
    otherwise spend their token budget on newlines."""
    if params.json is not None:
        return compiler.compile_json_schema(params.json, any_whitespace=False)
    if params.json_object:
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
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
