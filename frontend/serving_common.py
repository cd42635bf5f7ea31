"""What every endpoint family shares: the server's context, model-name checks, prompt checks, streaming plumbing."""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from core.tokenizer import encode
from frontend.engine_client import EngineClient, EngineDeadError, RequestFailedError, RequestRejectedError
from frontend.lifecycle import ServerShuttingDownError
from frontend.output_processor import Logprob, TokenStrings
from frontend.protocol import MAX_LOGPROBS, OpenAIError
from frontend.request_limits import DEFAULT_MAX_N, check_request_limits, max_token_chars
from frontend.request_logger import RequestLogger
from frontend.stream_frames import SSEResponse
from frontend.usage import UsageOptions
from ipc.messages import SamplingParams

T = TypeVar("T")

LOGPROB_FLOOR = -9999.0  # JSON has no -inf


@dataclass
class ServingContext:
    client: EngineClient
    tokenizer: Any | None
    served_model_names: list[str]
    model_path: str
    max_model_len: int
    vocab_size: int
    max_logprobs: int = MAX_LOGPROBS  # --max-logprobs
    default_sampling: dict[str, Any] = field(default_factory=dict)  # --generation-config
    request_logger: RequestLogger | None = None  # --enable-log-requests
    usage: UsageOptions = field(default_factory=UsageOptions)  # the server's usage flags
    max_n: int = DEFAULT_MAX_N  # --max-n
    trust_request_chat_template: bool = False  # --trust-request-chat-template
    chat_template_time_limit_s: float = 2.0
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice
    tool_call_parser: str | None = None  # --tool-call-parser

    def __post_init__(self) -> None:
        self._token_strings = TokenStrings(self.tokenizer)
        # Texts longer than this cannot fit the context: refused before tokenizing (see request_limits).
        self.max_prompt_chars = self.max_model_len * max_token_chars(self.tokenizer) or None
        # Tokenizing a long prompt takes milliseconds; the Rust tokenizer releases the GIL, so worker threads keep
        # the event loop (every stream's next token) free while it runs.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                 thread_name_prefix="tokenize")

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tokenizer = self.require_tokenizer()
        if len(text) < 256:
            return encode(tokenizer, text, add_special_tokens)
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool, encode, tokenizer, text, add_special_tokens)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy request work (tokenizing, decoding, parsing a big body) off the event loop, so /health
        and every stream keep answering while it runs."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    def check_limits(self, request: Any) -> None:
        """n, prompt-array, int64, vocabulary and character bounds: before any tokenizing or rendering."""
        check_request_limits(request, max_n=self.max_n, vocab_size=self.vocab_size,
                             max_prompt_chars=self.max_prompt_chars)

    def check_text_length(self, text: str, param: str) -> None:
        """A text (a rendered chat, a prompt) too long for the context, refused before tokenizing it."""
        if self.max_prompt_chars and len(text) > self.max_prompt_chars:
            raise OpenAIError(
                f"The input has {len(text)} characters, more than this model's context can hold "
                f"({self.max_prompt_chars} characters at most). Please reduce the length of the input.", param=param)

    def token_str(self, token_id: int) -> str:
        """A token's own text (vLLM's spelling for logprobs); ``token_id:N`` without a tokenizer."""
        text = self._token_strings(token_id)
        return f"token_id:{token_id}" if text is None else text

    def logprob_token(self, token_id: int, logprob: Logprob | None, as_token_ids: bool) -> str:
        """How a logprob entry names its token: ``token_id:N`` with return_tokens_as_token_ids, else its text."""
        if as_token_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.token_str(token_id)

    def decode(self, token_ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(token_ids)

    @staticmethod
    def prompt_logprobs_json(rows: list[dict[int, Logprob] | None] | None) -> list | None:
        """vLLM's prompt_logprobs shape: per prompt token, None or {token_id: {logprob, rank, decoded_token}}."""
        if rows is None:
            return None
        return [
            None if row is None else {
                tid: {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
                for tid, lp in row.items()
            }
            for row in rows
        ]

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if model and model not in self.served_model_names:
            raise OpenAIError(f"The model `{model}` does not exist.", status_code=404, param="model",
                              code="model_not_found")

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise OpenAIError("This server runs without a tokenizer (skip_tokenizer_init): send token ids.")
        return self.tokenizer

    def check_token_ids(self, token_ids: list[int], param: str = "prompt") -> None:
        """vLLM's wording: "Token id N is out of vocabulary" names the first id outside [0, vocab_size)."""
        if token_ids and (min(token_ids) < 0 or max(token_ids) >= self.vocab_size):
            bad = next(t for t in token_ids if t < 0 or t >= self.vocab_size)
            raise OpenAIError(f"Token id {bad} is out of vocabulary (vocabulary size {self.vocab_size}).",
                              param=param)

    def check_sampling_params(self, params: SamplingParams, bad_words: list[str] | None = None) -> None:
        """What only the model can tell: token ids inside the vocabulary; ``bad_words`` tokenized into
        ``params.bad_words_token_ids``."""
        if params.allowed_token_ids and not all(0 <= t < self.vocab_size for t in params.allowed_token_ids):
            raise OpenAIError("allowed_token_ids contains out-of-vocab token id!", param="allowed_token_ids")
        if params.logprob_token_ids:
            bad = sorted({t for t in params.logprob_token_ids if not 0 <= t < self.vocab_size})
            if bad:
                raise OpenAIError(f"logprob_token_ids contains out-of-vocab token ids {bad}: every id must be in "
                                  f"[0, {self.vocab_size}).", param="logprob_token_ids")
        if bad_words:
            params.bad_words_token_ids = bad_words_token_ids(self.require_tokenizer(), bad_words, self.vocab_size)
        if params.logit_bias:
            bad = sorted(t for t in params.logit_bias if t < 0 or t >= self.vocab_size)
            if bad:
                raise OpenAIError(f"token_id(s) {bad} in logit_bias contain out-of-vocab token ids. "
                                  f"Vocabulary size: {self.vocab_size}", param="logit_bias")

    def log_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        if self.request_logger is not None:
            self.request_logger.log(request_id, prompt, prompt_token_ids, params)

    def check_engine(self) -> None:
        if not self.client.is_healthy:
            raise OpenAIError(self.client.dead_error or "The engine is not running.", status_code=503)


def bad_words_token_ids(tokenizer: Any, words: list[str], vocab_size: int) -> list[list[int]]:
    """vLLM's bad_words tokenization: each word as written (leading space stripped), and again after a space
    when that spells it with a different first token of the same length (the word in mid-text)."""
    sequences: list[list[int]] = []
    for word in words:
        bare = encode(tokenizer, word.lstrip(), add_special_tokens=False)
        if not bare:
            raise OpenAIError(f"bad_words entry {word!r} has no tokens.", param="bad_words")
        sequences.append(bare)
        spaced = encode(tokenizer, " " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            sequences.append(spaced)
    invalid = [t for ids in sequences for t in ids if not 0 <= t < vocab_size]
    if invalid:
        raise OpenAIError(f"The model vocabulary size is {vocab_size}, but the following tokens were specified as "
                          f"bad: {invalid}. All token id values should be integers satisfying: 0 <= token_id < "
                          f"{vocab_size}.", param="bad_words")
    return sequences


def clamp_logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def engine_error(exc: Exception) -> OpenAIError:
    """Map an exception out of ``EngineClient.generate`` to the error the client sees."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, RequestRejectedError):
        return OpenAIError(str(exc), param=exc.param)
    if isinstance(exc, ValueError):  # e.g. a request id already in use
        return OpenAIError(str(exc))
    if isinstance(exc, ServerShuttingDownError):
        return OpenAIError(str(exc), status_code=503)
    if isinstance(exc, RequestFailedError):
        return OpenAIError(str(exc), status_code=500, err_type="InternalServerError")
    if isinstance(exc, EngineDeadError):
        return OpenAIError(str(exc), status_code=500, err_type="EngineDeadError")
    return OpenAIError(f"{type(exc).__name__}: {exc}", status_code=500)


async def merge_async_iterators(*iterators: AsyncIterator[T]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive: yields (which iterator, item)."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        except BaseException as exc:  # hand the failure to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for it in iterators:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()


async def run_until_disconnect(raw_request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it (which aborts its requests in the core)."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await raw_request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening; the status is for the access log only
    return task.result()


def json_response(model: Any) -> Response:
    if isinstance(model, msgspec.Struct):
        return Response(msgspec.json.encode(model), media_type="application/json")
    return JSONResponse(content=model.model_dump(mode="json"))


def sse_response(events: AsyncIterator[str | bytes]) -> SSEResponse:
    """An SSE stream of ``data: <json>`` events (JSON text, or frames already encoded by ``stream_frames``),
    ending with ``data: [DONE]``."""
    return SSEResponse(events, ping_s=15)


def error_event(exc: Exception) -> str:
    return json.dumps(engine_error(exc).body())

