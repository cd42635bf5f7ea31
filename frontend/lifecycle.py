"""The API process's life around the engine: loading, SIGTERM drain, engine death, and slow or idle connections.

- Loading: the port answers at once; ``/health`` and every API route answer 503 until the engine is READY.
- SIGTERM / Ctrl-C: new requests get 503; in-flight ones get ``--shutdown-timeout`` seconds to finish, then end
  with an OpenAI-shaped 503 (streams: an error event and ``data: [DONE]``); then uvicorn stops and the lifespan
  stops the engine. A second signal exits at once.
- Engine death: in-flight requests fail at once (``EngineClient``); an ERROR line names the exit status and the
  last error; the API process exits with status 1 once they are answered, so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from frontend.protocol import OpenAIError

logger = logging.getLogger("pagedserve.server")

_ANSWER_GRACE_S = 2.0  # after failing in-flight requests: time for their answers to leave before uvicorn stops


class ServerShuttingDownError(RuntimeError):
    """The server is draining (SIGTERM) and this request ran out of time: an HTTP 503."""


class Lifecycle:
    """Shared state of the process's life: whether the engine is ready, draining, how many requests are open."""

    def __init__(self, shutdown_timeout_s: float) -> None:
        self.shutdown_timeout_s = shutdown_timeout_s
        self.server: Any = None  # the uvicorn.Server, set by run_server (absent when the app runs elsewhere)
        self.ready = False
        self.draining = False
        self.exit_code = 0
        self.in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    def unavailable_reason(self) -> str | None:
        if self.draining:
            return "The server is shutting down."
        if not self.ready:
            return "The server is loading the model."
        return None

    # ------------------------------------------------------------------------------------------ transitions

    def request_exit(self, exit_code: int = 0) -> None:
        self.exit_code = self.exit_code or exit_code
        if self.server is not None:
            self.server.should_exit = True

    def begin_drain(self, client: Any) -> None:
        """From SIGTERM (via call_soon_threadsafe): drain in a task, then let uvicorn stop."""
        if self.draining:
            return
        self.draining = True
        logger.info("Shutting down: refusing new requests, waiting up to %.0f s for %d in flight.",
                    self.shutdown_timeout_s, self.in_flight)
        self._spawn(self._drain(client))

    async def _drain(self, client: Any) -> None:
        if client is not None:
            client.draining_error = ServerShuttingDownError("The server is shutting down.")
        deadline = time.monotonic() + self.shutdown_timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight and client is not None:
            count = client.fail_in_flight(ServerShuttingDownError(
                f"The server is shutting down: the request did not finish within --shutdown-timeout "
                f"{self.shutdown_timeout_s:g} s."))
            logger.warning("Shutdown timeout passed: ended %d request(s) with an error.", count)
            await self._wait_answered()
        self.request_exit(0)

    def engine_died(self, reason: str, exit_status: int | None, exit_process: bool = True) -> None:
        """The engine process is gone: log it, answer what is in flight (already failed), then exit non-zero.

        ``exit_process=False`` (an API process of ``--api-server-count``): keep answering 503 until the launcher,
        which watches the core too, stops every API process."""
        if self.exit_code:
            return
        logger.error("The engine core process died (exit status %s): %s. Exiting with status 1 so a supervisor "
                     "can restart the server.", exit_status, reason)
        self.exit_code = 1
        if exit_process:
            self._spawn(self._exit_after_answers())

    async def _exit_after_answers(self) -> None:
        await self._wait_answered()
        self.request_exit(1)

    async def _wait_answered(self) -> None:
        deadline = time.monotonic() + _ANSWER_GRACE_S
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class LifecycleMiddleware:
    """503 for API requests while loading or draining; counts the requests in flight (the drain waits on them)."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, always_open: frozenset[str]) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.always_open = always_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.always_open:
            await self.app(scope, receive, send)
            return
        reason = self.lifecycle.unavailable_reason()
        if reason is not None:
            error = OpenAIError(reason, status_code=503)
            from fastapi.responses import JSONResponse

            await JSONResponse(error.body(), status_code=503, headers={"Connection": "close"})(scope, receive, send)
            return
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for a request's head: a connection that opens (or goes idle between
    requests) and does not deliver a full request line and headers within ``timeout_request_headers`` seconds is
    closed, so idle and slow-loris clients cannot hold connections open forever."""

    timeout_request_headers: float = 10.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is None:
            self._head_timer = self.loop.call_later(self.timeout_request_headers, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._arm_head_timer()  # a new request starts arriving
        super().data_received(data)
        if self.conn.their_state in (h11.SEND_BODY, h11.DONE) or (
                self.cycle is not None and not self.cycle.response_complete):
            self._disarm_head_timer()  # the head is complete

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


def _trim_heap() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass


_trim_pending = False


def release_memory_soon() -> None:
    """After a big request: give freed heap pages back to the OS (glibc keeps them otherwise: the API process
    stayed at 3 GB after a few big bodies). Runs once in a worker thread, shortly after, coalescing bursts."""
    global _trim_pending
    if _trim_pending:
        return
    _trim_pending = True
    loop = asyncio.get_running_loop()

    def run() -> None:
        global _trim_pending
        _trim_pending = False
        loop.run_in_executor(None, _trim_heap)

    loop.call_later(1.0, run)


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools missing: uvicorn's h11 protocol serves
    HttpToolsProtocol = None


if HttpToolsProtocol is not None:
    class HeaderTimeoutHttpToolsProtocol(HttpToolsProtocol):
        """The same head deadline on uvicorn's httptools protocol (C parser: a fraction of h11's cost per request
        and per streamed chunk, see benchmarks/RESULTS.md)."""

        timeout_request_headers: float = 10.0
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        _arm_head_timer = HeaderTimeoutH11Protocol._arm_head_timer
        _disarm_head_timer = HeaderTimeoutH11Protocol._disarm_head_timer
        _head_timed_out = HeaderTimeoutH11Protocol._head_timed_out

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm_head_timer()  # a new request starts arriving (on_headers_complete disarms)
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._disarm_head_timer()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's HTTP protocol class with the head deadline: httptools when installed (a dependency), else h11."""
    base = HeaderTimeoutHttpToolsProtocol if HttpToolsProtocol is not None else HeaderTimeoutH11Protocol
    return type(base.__name__, (base,), {"timeout_request_headers": timeout_s})
