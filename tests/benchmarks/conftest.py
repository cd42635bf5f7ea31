"""A small OpenAI-compatible streaming server (aiohttp) as a test double for the load generator.

It streams one chunk per token like a real server, and can misbehave on purpose (HTTP errors, error events, truncated
streams, no usage) so the client's failure handling can be checked. It records every request body it gets.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
from aiohttp import web

# " the" is one token in SmolLM2's tokenizer, so n pieces re-tokenize to exactly n tokens.
TOKEN_TEXT = " the"


@dataclass
class FakeServerState:
    mode: str = "ok"  # ok | http_error | error_event | truncate | every_third_fails | no_usage
    token_delay: float = 0.0
    first_token_delay: float = 0.0
    bodies: list[dict] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    count: int = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\r\n\r\n".encode()


def _make_app(state: FakeServerState) -> web.Application:
    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        state.bodies.append(body)
        state.auth_headers.append(request.headers.get("Authorization"))
        state.count += 1
        index = state.count
        if state.mode == "http_error" or (state.mode == "every_third_fails" and index % 3 == 0):
            return web.json_response(
                {"error": {"message": "engine is on fire", "type": "internal_error", "code": 500}}, status=500)
        n = body.get("max_completion_tokens") if chat else body.get("max_tokens")
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            rid, created = f"cmpl-{index}", int(time.time())
            obj = "chat.completion.chunk" if chat else "text_completion"
            if chat:
                await response.write(_sse({"id": rid, "object": obj, "created": created, "model": body["model"],
                                           "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                        "finish_reason": None}]}))
            await asyncio.sleep(state.first_token_delay)
            for i in range(n):
                if i:
                    await asyncio.sleep(state.token_delay)
                if state.mode == "error_event" and i == 2:
                    await response.write(_sse({"error": {"message": "KV cache exploded", "code": 500}}))
                    return response
                if state.mode == "truncate" and i == 2:
                    return response  # no [DONE]
                finish = "length" if i == n - 1 else None
                choice = ({"index": 0, "delta": {"content": TOKEN_TEXT}, "finish_reason": finish} if chat
                          else {"index": 0, "text": TOKEN_TEXT, "finish_reason": finish})
                await response.write(_sse({"id": rid, "object": obj, "created": created, "model": body["model"],
                                           "choices": [choice]}))
            if state.mode != "no_usage":
                prompt_tokens = len(body.get("prompt", "").split()) if not chat else 0
                await response.write(_sse({"id": rid, "object": obj, "created": created, "model": body["model"],
                                           "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                                    "completion_tokens": n,
                                                                    "total_tokens": prompt_tokens + n}}))
            await response.write(_sse("[DONE]"))
            await response.write_eof()
            return response
        finally:
            state.in_flight -= 1

    async def completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=True)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


class FakeOpenAIServer:
    """Runs the app on its own event loop in a thread, on a free port."""

    def __init__(self) -> None:
        self.state = FakeServerState()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(_make_app(self.state), access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._runner = runner
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def start(self) -> FakeOpenAIServer:
        self._thread.start()
        assert self._started.wait(10), "fake server did not start"
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def fake_server():
    server = FakeOpenAIServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def bench_tokenizer():
    """The default model's tokenizer, loaded once (the load generator caches it too)."""
    from benchmarks.serve import load_tokenizer
    from core.model_source import DEFAULT_MODEL

    return load_tokenizer(DEFAULT_MODEL)
