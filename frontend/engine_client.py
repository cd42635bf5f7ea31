"""The frontend's handle on the engine-core process: start it, feed it requests, route its outputs.

One asyncio task reads the core's output socket and hands each step's outputs to the ``OutputProcessor``, which
holds the one table of in-flight requests (``RequestState``, ``EmbeddingState``): it turns token ids into
``RequestOutput``s, puts them (or an embedding) on the request's queue and records latency metrics. ``generate()``
is an async iterator over one request's queue; ``embed()`` awaits its one item.
The core's exit is watched through the process sentinel, so a crash (even ``kill -9``) fails every in-flight
request at once instead of leaving it hanging.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from core import envs
from core.engine_process import run_engine_core
from frontend.metrics import Metrics
from frontend.output_processor import CompletionOutput, OutputProcessor, RequestOutput
from ipc.messages import (
    AbortRequests,
    EngineConfig,
    EngineDead,
    EngineOutputs,
    EngineRequest,
    ReadyMessage,
    SamplingParams,
    Shutdown,
    UtilityRequest,
)
from ipc.transport import Encoder, IpcAddresses, make_socket, message_decoder

logger = logging.getLogger("pagedserve.frontend")

# Stream policy: each step's delta is its own SSE event; only when this many more are already waiting (the client,
# or this process, is slower than the stream) are they merged into one event. Nothing is ever dropped.
MERGE_BACKLOG = 8


class EngineDeadError(RuntimeError):
    """The engine-core process is gone; every request fails with a 5xx from now on."""


class EngineStartupError(RuntimeError):
    """The engine-core process failed (or took too long) before its READY handshake."""


class RequestRejectedError(ValueError):
    """The core refused a request (``EngineCore.add_request`` raised ``ValueError``): an HTTP 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestFailedError(RuntimeError):
    """The request failed inside an engine step (the core survived and failed it alone): an HTTP 500."""


@dataclass(frozen=True)
class EngineAttachment:
    """``--api-server-count N``: this API process talks to a core that the launcher started (``frontend/
    multi_api.py``): it binds these addresses, the core connects, and the core's exit is watched by its pid."""

    input_addr: str
    output_addr: str
    engine_pid: int
    client_index: int


class EngineClient:
    def __init__(self, config: EngineConfig, tokenizer: Any | None, model_name: str,
                 startup_timeout_s: float = 1800.0, attachment: EngineAttachment | None = None) -> None:
        self.config = config
        self.attachment = attachment
        self.client_index = attachment.client_index if attachment is not None else 0
        self._watch_fd: int | None = None  # readable once the core has exited (its sentinel, or a pidfd)
        self.model_name = model_name
        self.startup_timeout_s = startup_timeout_s
        self.processor = OutputProcessor(tokenizer, batched_detokenize=envs.batch_detokenize())
        self.ready: ReadyMessage | None = None
        self.metrics: Metrics | None = None
        self.dead_error: str | None = None
        self._utility_calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._encoder = Encoder()
        self._addrs: IpcAddresses | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._sync_ctx: zmq.Context | None = None
        self._async_ctx: zmq.asyncio.Context | None = None
        self._in_sock: zmq.Socket | None = None
        self._out_sock: zmq.asyncio.Socket | None = None
        self._output_task: asyncio.Task | None = None
        self._closed = False
        self.draining_error: Exception | None = None  # set by a SIGTERM drain: new requests are refused with it
        self.on_dead: Callable[[str, int | None], None] | None = None  # (last error, exit status) once it died
        self.last_error: str | None = None  # the core's own report (EngineDead), if it sent one

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def engine_pid(self) -> int | None:
        if self.attachment is not None:
            return self.attachment.engine_pid
        return self._proc.pid if self._proc is not None else None

    def _exit_code(self) -> int | None:
        return self._proc.exitcode if self._proc is not None else None

    @property
    def is_healthy(self) -> bool:
        return self.ready is not None and self.dead_error is None and not self._closed

    async def start(self) -> ReadyMessage:
        """Start the core process and wait for READY; raises ``EngineStartupError`` with the core's error."""
        loop = asyncio.get_running_loop()
        if self.attachment is None:
            self._addrs = IpcAddresses.create()
            input_addr, output_addr = self._addrs.input_addr, self._addrs.output_addr
        else:
            input_addr, output_addr = self.attachment.input_addr, self.attachment.output_addr
        self._sync_ctx = zmq.Context()
        self._async_ctx = zmq.asyncio.Context()
        self._in_sock = make_socket(self._sync_ctx, input_addr, zmq.PUSH, bind=True)
        self._out_sock = make_socket(self._async_ctx, output_addr, zmq.PULL, bind=True)
        if self.attachment is None:
            ctx = multiprocessing.get_context("spawn")
            self._proc = ctx.Process(
                target=run_engine_core,
                args=(self.config, input_addr, output_addr),
                name="pagedserve-engine",
            )
            self._proc.start()
            # Last resort if this process exits without shutdown(): multiprocessing's own exit hook would otherwise
            # wait forever on a core that only leaves once we are gone.
            atexit.register(self._kill_if_alive)
            self._watch_fd = self._proc.sentinel
        else:  # the launcher's child: a pidfd turns readable when it exits (kill -9 included)
            self._watch_fd = os.pidfd_open(self.attachment.engine_pid)
        exited = loop.create_future()
        loop.add_reader(self._watch_fd, self._on_process_exit, exited)
        decoder = message_decoder()
        recv = asyncio.ensure_future(self._out_sock.recv(copy=False))
        try:
            done, _ = await asyncio.wait({recv, exited}, timeout=self.startup_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            message = decoder.decode(recv.result().buffer) if recv in done else None
            if message is None:
                message = await self._last_message(decoder)
            if isinstance(message, ReadyMessage):
                self.ready = message
            else:
                reason = message.error if isinstance(message, EngineDead) else None
                if reason is None and not exited.done():
                    reason = f"no READY within {self.startup_timeout_s:.0f} s"
                elif reason is None:
                    reason = f"the process exited with code {self._exit_code()}"
                await self._stop_process()
                raise EngineStartupError(f"The engine core failed to start: {reason}")
        finally:
            if not recv.done():
                recv.cancel()
        self.metrics = Metrics(self.model_name, self.ready.max_model_len,
                               api_server=self.client_index if self.attachment is not None else None)
        self.metrics.record_cache_config(self.ready.block_size, self.ready.num_kv_blocks,
                                         self.config.enable_prefix_caching)
        self._output_task = asyncio.create_task(self._output_loop(decoder), name="engine-outputs")
        logger.info("engine core ready: %s, max_model_len=%d, %d KV blocks of %d tokens, on %s",
                    self.ready.model, self.ready.max_model_len, self.ready.num_kv_blocks, self.ready.block_size,
                    self.ready.device)
        return self.ready

    async def _last_message(self, decoder: msgspec.msgpack.Decoder) -> Any:
        """After the process exited: a message it sent just before (EngineDead), if any."""
        try:
            frame = await asyncio.wait_for(self._out_sock.recv(copy=False), timeout=0.2)
        except asyncio.TimeoutError:
            return None
        return decoder.decode(frame.buffer)

    def _on_process_exit(self, exited: asyncio.Future | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._watch_fd)
        if exited is not None and not exited.done():
            exited.set_result(None)
        if self.ready is not None and not self._closed:
            if self._proc is not None:  # the sentinel fires as the process exits, a moment before it can be reaped
                self._proc.join(timeout=1.0)
            self._fail_all(f"The engine core process exited unexpectedly (exit code {self._exit_code()}).")
            if self.on_dead is not None:
                self.on_dead(self.last_error or "it reported no error (killed by a signal?)", self._exit_code())

    def _kill_if_alive(self) -> None:
        if self._proc is not None and self._proc.exitcode is None:
            self._proc.kill()
            self._proc.join(5)

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the core (Shutdown, then SIGTERM, then SIGKILL) and close the sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fail_all("The server is shutting down.")
        await self._stop_process(timeout_s)
        if self._output_task is not None:
            self._output_task.cancel()
        if self.attachment is not None and self._watch_fd is not None:  # our pidfd (a sentinel closes itself)
            asyncio.get_running_loop().remove_reader(self._watch_fd)  # a no-op once the core's exit removed it
            os.close(self._watch_fd)
            self._watch_fd = None
        for sock in (self._in_sock, self._out_sock):
            if sock is not None:
                sock.close(linger=0)
        for ctx in (self._sync_ctx, self._async_ctx):
            if ctx is not None:
                ctx.term()
        if self._addrs is not None:
            self._addrs.cleanup()

    async def _stop_process(self, timeout_s: float = 10.0) -> None:
        proc = self._proc
        if proc is None or proc.exitcode is not None:
            return
        try:
            self._in_sock.send(self._encoder.encode(Shutdown()), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        # Before READY the core is loading and reads no messages: SIGTERM stops the load at once.
        for action in (None, proc.terminate, proc.kill) if self.ready is not None else (proc.terminate, proc.kill):
            if action is not None:
                action()
            deadline = time.monotonic() + timeout_s
            while proc.exitcode is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                proc.join(timeout=0)
            if proc.exitcode is not None:
                return

    # ------------------------------------------------------------------------------------------ requests

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams, stream_deltas: bool = True, final_only: bool = False,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields this request's outputs until it finishes. Leaving early (client gone) aborts it in the core.

        ``stream_deltas``: each output holds only what is new; ``final_only``: one output, when finished.
        ``cache_salt``: the prompt's prefix-cache blocks are shared only with requests of the same salt.
        """
        if not self.is_healthy:
            raise EngineDeadError(self.dead_error or "The engine core is not running.")
        if self.draining_error is not None:
            raise self.draining_error
        try:  # encode first: a value the wire format cannot carry fails this request before it holds any state
            frame = self._encoder.encode(EngineRequest(request_id, prompt_token_ids, params, cache_salt=cache_salt,
                                                       client_index=self.client_index))
        except (OverflowError, TypeError, ValueError, msgspec.EncodeError) as exc:
            raise RequestRejectedError(f"The request cannot be sent to the engine: {exc}") from None
        state = self.processor.add_request(request_id, prompt, prompt_token_ids, params,
                                           stream_deltas=stream_deltas and not final_only, final_only=final_only,
                                           queue=asyncio.Queue(), arrival=time.monotonic())
        finished = False
        if self.metrics is not None and self.metrics.api_server_requests is not None:
            self.metrics.api_server_requests.inc()
        try:
            self._in_sock.send(frame, copy=False)
            while not finished:
                item = await state.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if stream_deltas and not final_only and state.queue.qsize() >= MERGE_BACKLOG:
                    item = _merge_queued_deltas(item, state.queue)  # the client is behind: merge, never drop
                finished = item.finished
                yield item
        finally:
            if not finished:  # client gone, send failed, drain: release the state here and in the core
                self.abort(request_id)

    async def embed(self, request_id: str, prompt_token_ids: list[int]) -> bytes:
        """One prompt's embedding (float32 bytes) from an embedding engine. Leaving early (client gone) aborts it
        in the core."""
        if not self.is_healthy:
            raise EngineDeadError(self.dead_error or "The engine core is not running.")
        state = self.processor.add_embedding_request(request_id, len(prompt_token_ids), queue=asyncio.Queue(),
                                                     arrival=time.monotonic())
        self._send(EngineRequest(request_id, prompt_token_ids, SamplingParams(max_tokens=1),
                                 client_index=self.client_index))
        finished = False
        try:
            item = await state.queue.get()
            finished = True
            if isinstance(item, BaseException):
                raise item
            return item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request here and in the core (which frees its blocks at once)."""
        state = self.processor.abort_request(request_id)
        if state is not None and self.metrics is not None:
            state.record_finished(self.metrics, "abort", time.monotonic())
        if self.is_healthy:
            self._send(AbortRequests([request_id]))

    async def call_utility(self, name: str, *args: Any, timeout_s: float = 60.0) -> Any:
        """Run ``EngineCore.<name>(*args)`` in the core process and return its result."""
        if not self.is_healthy:
            raise EngineDeadError(self.dead_error or "The engine core is not running.")
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._utility_calls[call_id] = future
        self._send(UtilityRequest(call_id, name, list(args), client_index=self.client_index))
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._utility_calls.pop(call_id, None)

    def _send(self, message: msgspec.Struct) -> None:
        self._in_sock.send(self._encoder.encode(message), copy=False)

    # ------------------------------------------------------------------------------------------ outputs

    async def _output_loop(self, decoder: msgspec.msgpack.Decoder) -> None:
        try:
            while True:
                frame = await self._out_sock.recv(copy=False)
                message = decoder.decode(frame.buffer)
                if isinstance(message, EngineOutputs):
                    self._handle_outputs(message)
                elif isinstance(message, EngineDead):
                    logger.error("engine core died: %s", message.error)
                    self.last_error = message.error.splitlines()[0]
                    self._fail_all(f"The engine core died: {message.error.splitlines()[0]}")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let routing die silently: every request would hang
            logger.exception("output loop failed")
            self._fail_all(f"The frontend's output loop failed: {exc}")

    def _handle_outputs(self, message: EngineOutputs) -> None:
        metrics = self.metrics
        if message.outputs:
            processed = self.processor.process_outputs(message.outputs, metrics, time.monotonic())
            if processed.to_abort and self.is_healthy:
                ids, indices = zip(*processed.to_abort)
                self._send(AbortRequests(list(ids), list(indices)))
        if message.scheduler_stats is not None:
            metrics.record_scheduler_stats(message.scheduler_stats)
        if message.utility_output is not None:
            future = self._utility_calls.get(message.utility_output.call_id)
            if future is not None and not future.done():
                if message.utility_output.error is not None:
                    future.set_exception(RuntimeError(message.utility_output.error))
                else:
                    future.set_result(message.utility_output.result)
        for error in message.errors:
            state = self.processor.abort_request(error.request_id)
            if state is not None:
                state.queue.put_nowait(RequestFailedError(error.message) if error.internal
                                       else RequestRejectedError(error.message, error.param))

    def fail_in_flight(self, error: Exception) -> int:
        """End every in-flight request with ``error`` (the drain's deadline passed) and abort them in the core;
        returns how many there were."""
        states = self.processor.abort_all()
        for state in states:
            state.queue.put_nowait(error)
        if states and self.is_healthy:
            self._send(AbortRequests([state.request_id for state in states]))
        return len(states)

    def _fail_all(self, reason: str) -> None:
        """Every in-flight request and utility call ends now with ``EngineDeadError``."""
        if self.dead_error is None and not self._closed:
            self.dead_error = reason
        error = EngineDeadError(reason)
        for state in self.processor.abort_all():
            state.queue.put_nowait(error)
        for future in self._utility_calls.values():
            if not future.done():
                future.set_exception(error)


def _merge_queued_deltas(first: RequestOutput, queue: asyncio.Queue) -> RequestOutput:
    """Fold delta outputs that piled up while the consumer was busy into one (fewer, larger SSE events)."""
    merged = first
    while not merged.finished and not queue.empty():
        nxt = queue.get_nowait()
        if isinstance(nxt, BaseException):
            queue.put_nowait(nxt)  # the error surfaces on the next get
            break
        by_index: dict[int, CompletionOutput] = {c.index: c for c in merged.outputs}
        for c in nxt.outputs:
            prev = by_index.get(c.index)
            if prev is None:
                by_index[c.index] = c
                continue
            prev.text += c.text
            prev.token_ids = prev.token_ids + c.token_ids
            if c.logprobs is not None:
                prev.logprobs = (prev.logprobs or []) + c.logprobs
            prev.cumulative_logprob = c.cumulative_logprob
            prev.finish_reason = c.finish_reason
            prev.stop_reason = c.stop_reason
        merged.outputs = [by_index[i] for i in sorted(by_index)]
        merged.finished = nxt.finished
        merged.num_cached_tokens = max(merged.num_cached_tokens, nxt.num_cached_tokens)
        merged.first_token_time, merged.last_token_time = nxt.first_token_time, nxt.last_token_time
        merged.num_generation_tokens = nxt.num_generation_tokens
        if merged.prompt_logprobs is None:
            merged.prompt_logprobs = nxt.prompt_logprobs
    return merged
