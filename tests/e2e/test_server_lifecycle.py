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
from tests.frontend.server_process import ServerProcess, pid_alive

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_llama_dir(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture
def server(model_dir):
    srv = ServerProcess(model_dir, "--served-model-name", MODEL, "--max-model-len", "2048",
                        "--num-gpu-blocks-override", "512")
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

    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 503 and "error" in health.json()
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
    assert 500 <= r.status_code < 600 and "error" in r.json()
    # The frontend still exits cleanly on SIGTERM.
    assert server.stop(signal.SIGTERM, timeout_s=30) is not None


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
