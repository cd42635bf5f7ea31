"""Process lifecycle of the server: engine crash (kill -9), SIGTERM, and the frontend dying under the engine.

Each test starts its own server (a tiny random model), since each ends it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.frontend.model_files import tiny_llama_dir
from tests.frontend.server_process import REPO, ServerProcess, child_pids, pid_alive

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_llama_dir(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture
def server(model_dir):
    srv = ServerProcess(model_dir, "--served-model-name", MODEL, "--max-model-len", "2048",
                        "--num-gpu-blocks-override", "512", "--shutdown-timeout", "2")
    yield srv
    srv.stop(signal.SIGKILL)
    # No test may leave an engine behind.
    for pid in getattr(srv, "_engine_pids", []):
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _long_body(stream: bool) -> dict:
    return {"model": MODEL, "prompt": "Tell me everything", "max_tokens": 2000, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_engine_kill_fails_in_flight_requests_fast(server):
    engine = server.engine_pid()
    server._engine_pids = [engine]
    results: dict[str, object] = {}
    streaming_started = threading.Event()

    def non_streaming():
        try:
            r = httpx.post(f"{server.url}/v1/completions", json=_long_body(False), timeout=60)
            results["full"] = (r.status_code, r.json(), time.monotonic())
        except Exception as exc:  # a hang or a dropped connection would be a failure too
            results["full"] = exc

    def streaming():
        events = []
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=_long_body(True), timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        streaming_started.set()
            results["stream"] = (r.status_code, events, time.monotonic())
        except Exception as exc:
            results["stream"] = exc
            streaming_started.set()

    threads = [threading.Thread(target=non_streaming), threading.Thread(target=streaming)]
    for t in threads:
        t.start()
    assert streaming_started.wait(60)
    time.sleep(0.2)
    os.kill(engine, signal.SIGKILL)
    killed_at = time.monotonic()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a request hung after the engine died"

    status, body, done_at = results["full"]
    assert 500 <= status < 600 and body["error"]["code"] == status
    assert done_at - killed_at < 5.0
    status, events, done_at = results["stream"]
    assert status == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert 500 <= error["code"] < 600
    assert done_at - killed_at < 5.0

    # The API process answers what was in flight, then exits non-zero so a supervisor restarts it.
    assert server.proc.wait(5) == 1
    assert "The engine core process died (exit status -9)" in server.log_text()
    assert not child_pids(server.proc.pid)


def test_sigterm_with_a_stream_in_flight_stops_both_processes(server):
    engine = server.engine_pid()
    server._engine_pids = [engine]
    with httpx.stream("POST", f"{server.url}/v1/completions", json=_long_body(True), timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)  # raises if the frontend does not exit
    assert _wait_gone(engine, 15), "engine process left behind after SIGTERM"


def test_frontend_killed_engine_exits(server):
    engine = server.engine_pid()
    server._engine_pids = [engine]
    server.proc.kill()
    server.proc.wait(10)
    assert _wait_gone(engine, 10), "engine process orphaned after the frontend was killed"


def _stream_events(url: str, body: dict, out: dict, key: str, started: threading.Event) -> None:
    events = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
        out[key] = (r.status_code, events)
    except Exception as exc:
        out[key] = exc
        started.set()


def test_sigterm_drains_streams_then_ends_the_rest_with_an_error(server):
    """8 streams in flight at SIGTERM: the short ones finish; the long ones end after --shutdown-timeout with an
    error event and [DONE]; a non-streaming one gets an OpenAI-shaped 503; new requests get 503; exit 0."""
    engine = server.engine_pid()
    server._engine_pids = [engine]
    results: dict[str, object] = {}
    events = [threading.Event() for _ in range(8)]
    threads = []
    for i in range(8):
        body = _long_body(True) if i % 2 else {**_long_body(True), "max_tokens": 40}
        threads.append(threading.Thread(target=_stream_events, args=(server.url, body, results, f"s{i}", events[i])))

    def non_streaming():
        r = httpx.post(f"{server.url}/v1/completions", json=_long_body(False), timeout=60)
        results["full"] = (r.status_code, r.json())

    threads.append(threading.Thread(target=non_streaming))
    for t in threads:
        t.start()
    for e in events:
        assert e.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == 503
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert server.proc.wait(30) == 0
    for i in range(8):
        status, evs = results[f"s{i}"]
        assert status == 200 and evs[-1] == "[DONE]"
        last = json.loads(evs[-2])
        if i % 2:  # long: cut by the shutdown timeout
            assert last["error"]["code"] == 503 and "shutting down" in last["error"]["message"]
        else:  # short: finished normally
            assert "error" not in last and any(json.loads(e)["choices"][0]["finish_reason"] == "length"
                                               for e in evs[:-1] if "choices" in json.loads(e))
    status, body = results["full"]
    assert status == 503 and body["error"]["code"] == 503
    assert "CancelledError" not in server.log_text()
    assert _wait_gone(engine, 10), "engine process left behind after SIGTERM"


def test_health_is_503_while_loading_and_sigterm_stops_the_load(model_dir):
    srv = ServerProcess(model_dir, "--served-model-name", MODEL, wait=False)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"{srv.url}/health", timeout=2).status_code
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert status == 503, "the port should answer 503 while the model loads"
        engines = [p for p in child_pids(srv.proc.pid)]
        srv.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        srv.proc.wait(15)
        assert time.monotonic() - started < 10
        for pid in engines:
            assert _wait_gone(pid, 10), "engine left behind after SIGTERM during loading"
    finally:
        srv.stop(signal.SIGKILL)


def test_port_in_use_fails_before_loading(model_dir):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "frontend.cli", "serve", model_dir, "--host", "127.0.0.1",
                               "--port", str(port)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 1
    assert "Cannot listen on 127.0.0.1" in proc.stderr and "in use" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 30
