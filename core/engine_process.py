"""The engine-core process: READY handshake, then the busy loop around ``EngineCore.step()``.

Socket reading and msgpack decoding run on one background thread, encoding and sending on another, so the main
thread only schedules and runs the model: the GPU never waits on msgpack. The main thread blocks (on the input
queue) only when the core has no work at all.

Lifecycle: ``Shutdown``, SIGTERM or the death of the parent process end the loop cleanly (exit 0); an exception
is reported to the frontend as ``EngineDead`` and ends the process with exit status 1. A step that raises is not
such an exception: ``EngineCore.step`` fails the request it blames alone (core/step_recovery.py) and raises only
when it must not go on.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any

import msgspec
import zmq

from core import envs
from core.gc_tuning import GcPauseRecorder, freeze_startup_heap
from ipc.messages import (
    AbortRequests,
    EngineConfig,
    EngineDead,
    EngineOutputs,
    EngineRequest,
    RequestError,
    SchedulerStats,
    Shutdown,
    UtilityOutput,
    UtilityRequest,
)
from ipc.routing import OutputRouter
from ipc.transport import Encoder, input_decoder, make_socket, parent_alive

logger = logging.getLogger("pagedserve.engine")

_PARENT_POLL_S = 0.5
_SEND_LINGER_MS = 2000  # let the last messages (EngineDead) leave before the socket closes


class _Stop(Exception):
    """Raised in the main thread to leave the busy loop cleanly (SIGTERM, parent gone)."""


class EngineProcess:
    """Owns the sockets, the two I/O threads and the ``EngineCore``; ``run()`` is the process's life."""

    def __init__(self, config: EngineConfig, input_addr: str | list[str], output_addr: str | list[str]) -> None:
        """One address each for one API process; lists (same length) for ``--api-server-count N``: the input
        socket reads every API process's requests, and each output socket goes to one API process."""
        self.config = config
        self._ctx = zmq.Context(io_threads=1)
        input_addrs = [input_addr] if isinstance(input_addr, str) else input_addr
        output_addrs = [output_addr] if isinstance(output_addr, str) else output_addr
        self._in_sock = make_socket(self._ctx, input_addrs[0], zmq.PULL, bind=False)
        for addr in input_addrs[1:]:
            self._in_sock.connect(addr)
        self._out_socks = [make_socket(self._ctx, addr, zmq.PUSH, bind=False) for addr in output_addrs]
        for sock in self._out_socks:
            sock.setsockopt(zmq.LINGER, _SEND_LINGER_MS)
        self._router = OutputRouter(len(self._out_socks))
        self._inputs: queue.Queue[Any] = queue.Queue()
        self._outputs: queue.Queue[Any] = queue.Queue()
        self._stopping = threading.Event()
        self._core: Any = None
        self._last_stats: tuple = (0, 0, 0.0)  # what the frontend's gauges show before any stats arrive
        self._gc_pauses = GcPauseRecorder()
        self._threads = [
            threading.Thread(target=self._recv_loop, name="engine-input", daemon=True),
            threading.Thread(target=self._send_loop, name="engine-output", daemon=True),
        ]

    # ---------------------------------------------------------------------------------------------- threads

    def _recv_loop(self) -> None:
        decoder = input_decoder()
        poller = zmq.Poller()
        poller.register(self._in_sock, zmq.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(100):
                continue
            frame = self._in_sock.recv(copy=False)
            try:
                self._inputs.put(decoder.decode(frame.buffer))
            except Exception as exc:  # a malformed message must not take the engine down
                logger.exception("dropping an undecodable input message")
                request_id = _request_id_of(frame.buffer)
                if request_id is not None:  # fail that request alone, or its client would wait forever
                    error = RequestError(request_id, f"The engine could not decode the request: {exc}")
                    self._outputs.put(EngineOutputs(errors=[error], timestamp=time.time()))

    def _send_loop(self) -> None:
        encoder = Encoder()
        while True:
            message = self._outputs.get()
            if message is None:
                return
            for client, part in self._router.route(message):
                self._out_socks[client].send(encoder.encode(part), copy=False)

    def _watch_parent(self, parent_pid: int) -> None:
        while not self._stopping.wait(_PARENT_POLL_S):
            if not parent_alive(parent_pid):
                logger.warning("the frontend process is gone; shutting the engine down")
                os.kill(os.getpid(), signal.SIGTERM)
                return

    # ---------------------------------------------------------------------------------------------- main

    def run(self) -> int:
        parent_pid = os.getppid()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        # Ctrl-C reaches the whole process group; the frontend decides how to stop us (Shutdown / SIGTERM).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for t in self._threads:
            t.start()
        threading.Thread(target=self._watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
        status = 0
        try:
            from core.distributed import mp_executor
            from core.pooling_engine import create_engine_core  # EngineCore, or the embedding engine

            mp_executor.on_worker_death = self._on_worker_death
            self._core = create_engine_core(self.config)
            # Startup's heap (model modules, compiled kernels, tokenizer) is never garbage: freeze it so no
            # collection rescans it between steps (a full one took 239 ms on a W5-like CPU run: benchmarks/gc_pauses).
            freeze_startup_heap()
            self._gc_pauses.install()
            self._outputs.put(self._core.ready_message())
            self._busy_loop()
        except (_Stop, SystemExit, KeyboardInterrupt):
            pass
        except BaseException as exc:  # report, then die: the frontend fails in-flight requests at once
            logger.exception("engine core failed")
            self._outputs.put(EngineDead(error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
            status = 1
        finally:
            self._close()
        return status

    def _on_worker_death(self, reason: str) -> None:
        """A tensor-parallel worker died (the executor has killed the others): report EngineDead and end this
        process now. The main thread may be blocked in a collective that never returns (NCCL), so no clean exit."""
        self._outputs.put(EngineDead(error=f"RuntimeError: {reason}"))
        self._outputs.put(None)
        self._threads[1].join(timeout=2)
        time.sleep(0.2)  # the last frame leaves through ZeroMQ's I/O thread
        os._exit(1)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self._stopping.is_set():
            self._stopping.set()
            raise _Stop()

    def _busy_loop(self) -> None:
        core = self._core
        while True:
            if not core.has_work():
                self._send_idle_stats()
                if not self._handle(self._inputs.get()):
                    return
            while True:
                try:
                    message = self._inputs.get_nowait()
                except queue.Empty:
                    break
                if not self._handle(message):
                    return
            if core.has_work():
                out = core.step()
                stats_changed = self._stats_changed(out.scheduler_stats)  # always: keeps _last_stats current
                if out.outputs or stats_changed:
                    self._outputs.put(out)

    def _handle(self, message: Any) -> bool:
        """Apply one input; False on Shutdown."""
        if isinstance(message, EngineRequest):
            if self._router.num_clients > 1:
                self._router.add_request(message)  # before any of its outputs can be queued
            try:
                self._core.add_request(message)
            except Exception as exc:  # one bad request fails alone, never the engine
                if not isinstance(exc, ValueError):
                    logger.exception("request %s failed on admission", message.request_id)
                text = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                error = RequestError(message.request_id, text, getattr(exc, "param", None))
                self._outputs.put(EngineOutputs(errors=[error], timestamp=time.time()))
        elif isinstance(message, AbortRequests):
            self._core.abort_requests(message.request_ids, message.indices)
        elif isinstance(message, UtilityRequest):
            self._outputs.put(EngineOutputs(utility_output=self._call_utility(message), timestamp=time.time()))
        elif isinstance(message, Shutdown):
            return False
        return True

    def gc_info(self) -> dict[str, Any]:
        """This process's collector: objects frozen at startup, thresholds, pauses since (utility ``gc_info``)."""
        recorder = self._gc_pauses
        return {"frozen_objects": gc.get_freeze_count(), "threshold": list(gc.get_threshold()),
                "pause_count": list(recorder.count), "pause_total_s": list(recorder.total_s),
                "pause_max_s": list(recorder.max_s)}

    def _call_utility(self, message: UtilityRequest) -> UtilityOutput:
        client = message.client_index
        if message.name == "gc_info":  # about this process, not the EngineCore
            return UtilityOutput(message.call_id, result=self.gc_info(), client_index=client)
        if message.name.startswith("_") or not callable(getattr(self._core, message.name, None)):
            return UtilityOutput(message.call_id, error=f"unknown utility call {message.name!r}", client_index=client)
        try:
            return UtilityOutput(message.call_id, result=getattr(self._core, message.name)(*message.args),
                                 client_index=client)
        except Exception as exc:
            return UtilityOutput(message.call_id, error=f"{type(exc).__name__}: {exc}", client_index=client)

    def _stats_changed(self, stats: SchedulerStats | None) -> bool:
        """Whether these stats tell the frontend anything new (a changed gauge or a non-zero counter delta)."""
        if stats is None:
            return False
        if stats.num_preemptions or stats.prefix_cache_queries or stats.prefix_cache_hits:
            self._last_stats = (stats.num_running, stats.num_waiting, stats.kv_cache_usage)
            return True
        key = (stats.num_running, stats.num_waiting, stats.kv_cache_usage)
        if key == self._last_stats:
            return False
        self._last_stats = key
        return True

    def _send_idle_stats(self) -> None:
        """On going idle, make sure the frontend's gauges show the idle state (blocks back after aborts)."""
        snapshot = self._core.get_stats()
        stats = SchedulerStats(
            num_running=int(snapshot.get("num_running", 0)),
            num_waiting=int(snapshot.get("num_waiting", 0)),
            kv_cache_usage=float(snapshot.get("kv_cache_usage", 0.0)),
        )
        if self._stats_changed(stats):
            self._outputs.put(EngineOutputs(scheduler_stats=stats, timestamp=time.time()))

    def _close(self) -> None:
        self._stopping.set()
        if self._core is not None:
            logger.info("GC pauses while serving: %s", self._gc_pauses.summary())
            try:
                self._core.shutdown()
            except Exception:
                logger.exception("engine core shutdown failed")
        self._outputs.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=5)
        self._in_sock.close()
        for sock in self._out_socks:
            sock.close()
        self._ctx.term()


def _request_id_of(buffer: Any) -> str | None:
    """The request id of an ``EngineRequest`` frame that failed to decode (``["add", request_id, ...]``)."""
    try:
        raw = msgspec.msgpack.decode(buffer)
    except Exception:
        return None
    if isinstance(raw, list) and len(raw) > 1 and raw[0] == "add" and isinstance(raw[1], str):
        return raw[1]
    return None


def _limit_cpu_threads() -> None:
    """On a CPU-only machine, leave one core to the API process: torch's OpenMP threads spin, and two processes
    spinning on two cores made a decode step 20x slower in our CI-sized machine."""
    import torch

    if torch.cuda.is_available() or envs.omp_num_threads_set():
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))


def run_engine_core(config: EngineConfig, input_addr: str | list[str], output_addr: str | list[str]) -> None:
    """Entry point of the engine-core process (a ``multiprocessing`` spawn target)."""
    logging.basicConfig(
        level=envs.log_level(),
        format="%(asctime)s %(levelname)s [engine] %(message)s",
    )
    _limit_cpu_threads()
    status = EngineProcess(config, input_addr, output_addr).run()
    if status:
        sys.exit(status)
