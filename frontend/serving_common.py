"""What every endpoint family shares: the server's context, model-name checks, prompt checks, streaming plumbing."""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from core.tokenizer import encode
from frontend.engine_client import EngineClient, EngineDeadError, RequestRejectedError
from frontend.output_processor import Logprob, TokenStrings
from frontend.protocol import MAX_LOGPROBS, OpenAIError
from frontend.request_logger import RequestLogger
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
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice
    tool_call_parser: str | None = None  # --tool-call-parser

    def __post_init__(self) -> None:
        self._token_strings = TokenStrings(self.tokenizer)
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

    def token_str(self, token_id: int) -> str:
        """A token's own text (vLLM's spelling for logprobs); ``token_id:N`` without a tokenizer."""
        text = self._token_strings(token_id)
        return f"token_id:{token_id}" if text is None else text

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
            raise OpenAIError(f"The model `{model}` does not exist.", param="model")

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise OpenAIError("This server runs without a tokenizer (skip_tokenizer_init): send token ids.")
        return self.tokenizer

    def check_token_ids(self, token_ids: list[int], param: str = "prompt") -> None:
        if token_ids and (min(token_ids) < 0 or max(token_ids) >= self.vocab_size):
            raise OpenAIError(f"Token ids must be in [0, {self.vocab_size}).", param=param)

    def check_sampling_params(self, params: SamplingParams) -> None:
        """What only the model can tell: token ids inside the vocabulary."""
        if params.logit_bias:
            self.check_token_ids(list(params.logit_bias), param="logit_bias")

    def log_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        if self.request_logger is not None:
            self.request_logger.log(request_id, prompt, prompt_token_ids, params)

    def check_engine(self) -> None:
        if not self.client.is_healthy:
            raise OpenAIError(self.client.dead_error or "The engine is not running.", status_code=503)


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


def sse_response(events: AsyncIterator[str]) -> EventSourceResponse:
    """An SSE stream of ``data: <json>`` events, ending with ``data: [DONE]``."""

    async def with_done() -> AsyncIterator[dict]:
        async for data in events:
            yield {"data": data}
        yield {"data": "[DONE]"}

    return EventSourceResponse(with_done(), ping=15, sep="\n")


def error_event(exc: Exception) -> str:
    return json.dumps(engine_error(exc).body())

