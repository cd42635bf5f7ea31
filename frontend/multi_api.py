"""``--api-server-count N``: N API processes on one port, one engine core, as vLLM scales its API side out.

One asyncio process tops out at a few thousand streamed tokens a second (``benchmarks/RESULTS.md``): tokenizing,
detokenizing, JSON and HTTP are per request and per token. This launcher (the ``pagedserve serve`` process) binds
the port, starts the engine core, then N API processes that each get the listening socket (the kernel spreads
connections over them) and their own pair of ZeroMQ sockets, tokenizer and detokenizer. The core reads every
process's requests and sends each request's outputs to the process that sent it (``ipc/routing.py``).

Metrics: Prometheus multiprocess mode (a private directory), so ``/metrics`` from any process is the sum.
Health: each process watches the core by a pidfd; when the core dies every process fails its requests (5xx),
``/health`` answers 503, and the processes exit 1, then so does the launcher. SIGTERM to the launcher drains the
API processes (``--shutdown-timeout``), then stops the core; if any API process dies, the rest are stopped too.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time

from core import envs
from frontend.server_options import ServerOptions
from ipc.config import EngineConfig
from ipc.transport import IpcAddresses

logger = logging.getLogger("pagedserve.launcher")

_DEAD_CORE_GRACE_S = 1.0  # after the core died: the API processes answer their requests before being stopped
_STOP_GRACE_S = 15.0  # beyond --shutdown-timeout: time for an API process to close after its drain


def run_multi_server(engine_config: EngineConfig, options: ServerOptions, sock: socket.socket) -> int:
    """Run the core and ``options.num_api_servers`` API processes until SIGTERM or a death; the exit status.

    ``sock``: a listening Unix socket (``--uds``) handed to every API process, or a TCP socket bound with
    SO_REUSEPORT and not listening: each API process then listens on its own socket of the same port."""
    from core.engine_process import run_engine_core
    from frontend.engine_client import EngineAttachment

    count = options.num_api_servers
    metrics_dir = tempfile.mkdtemp(prefix="pagedserve-metrics-")
    envs.set_prometheus_multiproc_dir(metrics_dir)  # read by prometheus_client as the children import it
    addrs = [IpcAddresses.create() for _ in range(count)]
    ctx = multiprocessing.get_context("spawn")
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        signals.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    core = ctx.Process(target=run_engine_core, name="pagedserve-engine",
                       args=(engine_config, [a.input_addr for a in addrs], [a.output_addr for a in addrs]))
    core.start()
    shared = sock if options.uds else None
    workers = []
    for index, a in enumerate(addrs):
        attachment = EngineAttachment(a.input_addr, a.output_addr, core.pid, index)
        worker = ctx.Process(target=run_api_worker, name=f"pagedserve-api-{index}",
                             args=(engine_config, options, shared, attachment, os.getpid()))
        worker.start()
        workers.append(worker)
    if shared is not None:
        sock.close()  # the API processes hold it now
    logger.info("engine core pid %d; %d API server processes, pids %s", core.pid, count,
                [w.pid for w in workers])
    status = 0
    try:
        while not stop.is_set():
            sentinels = [core.sentinel] + [w.sentinel for w in workers]
            ready = multiprocessing.connection.wait(sentinels, timeout=0.5)
            if not ready:
                continue
            if core.sentinel in ready:
                logger.error("The engine core exited (status %s); stopping the API servers.", core.exitcode)
                time.sleep(_DEAD_CORE_GRACE_S)  # they answer in-flight requests (5xx) and /health 503 meanwhile
                for w in workers:
                    _signal(w, signal.SIGTERM)
            else:
                dead = [w for w in workers if w.exitcode is not None]
                logger.error("API server %s exited (status %s); stopping the server.",
                             [w.name for w in dead], [w.exitcode for w in dead])
            status = 1
            break
        if stop.is_set() and signals and signals[0] == signal.SIGTERM:
            for w in workers:  # each drains its requests (the first SIGTERM), then exits
                _signal(w, signal.SIGTERM)
        # (Ctrl-C reached the whole process group: the API processes are draining already.)
        _wait(workers, options.shutdown_timeout + _STOP_GRACE_S if status == 0 else _STOP_GRACE_S)
        if any(w.exitcode not in (0, None) for w in workers):
            status = status or 1
    finally:
        for w in workers:
            _stop(w)
        _stop(core)
        for a in addrs:
            a.cleanup()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def run_api_worker(engine_config: EngineConfig, options: ServerOptions, sock: socket.socket | None,
                   attachment: object, launcher_pid: int) -> None:
    """One API process (a spawn target): serve on the shared socket (or its own SO_REUSEPORT one), talking to
    the launcher's core."""
    from frontend.api_server import bind_socket, serve_on_socket

    logging.basicConfig(level=envs.log_level(),
                        format=f"%(asctime)s %(levelname)s [api {attachment.client_index}] [%(name)s] %(message)s")
    threading.Thread(target=_watch_launcher, args=(launcher_pid,), daemon=True, name="launcher-watch").start()
    if sock is None:
        sock = bind_socket(options.host, options.port, reuse_port=True)
    serve_on_socket(engine_config, options, sock, attachment)


def _watch_launcher(launcher_pid: int) -> None:
    """The launcher was killed (kill -9): stop, rather than serve without anyone to stop us."""
    while True:
        time.sleep(0.5)
        if os.getppid() != launcher_pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _signal(proc: multiprocessing.process.BaseProcess, sig: int) -> None:
    if proc.exitcode is None and proc.pid is not None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def _wait(procs: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))


def _stop(proc: multiprocessing.process.BaseProcess) -> None:
    """SIGTERM, then SIGKILL after a few seconds."""
    if proc.exitcode is None:
        proc.terminate()
        proc.join(10)
    if proc.exitcode is None:
        proc.kill()
        proc.join(5)
