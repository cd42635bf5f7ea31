"""A tensor-parallel worker killed mid-run takes the server down cleanly: in-flight requests get a 5xx (the stream an
error event), the API process exits non-zero, and no process of the tree is left (no orphan worker, no hang)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.frontend.model_files import tiny_llama_dir
from tests.frontend.server_process import ServerProcess, child_pids, pid_alive

MODEL = "tiny-llama"


def _body(stream: bool) -> dict:
    return {"model": MODEL, "prompt": "Tell me everything", "max_tokens": 2000, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def _wait_gone(pids: list[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("layout", [["-tp", "2"], ["-pp", "2"]], ids=["tp2", "pp2-micro-batches"])
def test_killed_worker_fails_requests_and_ends_the_process_tree(tmp_path, layout):
    """With -pp 2 the worker is the last stage and dies while micro-batches are in flight (rank 0 may be waiting
    for its hidden states)."""
    model = str(tiny_llama_dir(tmp_path / "tiny-llama"))
    server = ServerProcess(model, "--served-model-name", MODEL, "--max-model-len", "2048",
                           "--num-gpu-blocks-override", "512", *layout)
    engine = server.engine_pid()
    workers = [p for p in child_pids(engine) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    tree = [engine, *workers]
    try:
        assert len(workers) == 1, workers
        results: dict[str, object] = {}
        streaming = threading.Event()

        def non_streaming():
            try:
                r = httpx.post(f"{server.url}/v1/completions", json=_body(False), timeout=60)
                results["full"] = (r.status_code, r.json())
            except Exception as exc:
                results["full"] = exc

        def stream():
            events = []
            try:
                with httpx.stream("POST", f"{server.url}/v1/completions", json=_body(True), timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            streaming.set()
                results["stream"] = (r.status_code, events)
            except Exception as exc:
                results["stream"] = exc
                streaming.set()

        threads = [threading.Thread(target=non_streaming), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        assert streaming.wait(60)
        time.sleep(0.2)
        os.kill(workers[0], signal.SIGKILL)
        killed_at = time.monotonic()
        health = 200  # until the death is noticed (the watcher's wake-up): then 503, or the API process is gone
        while health == 200 and time.monotonic() - killed_at < 10:
            try:
                health = httpx.get(f"{server.url}/health", timeout=5).status_code
            except httpx.HTTPError:
                health = None
            time.sleep(0.05)
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a request hung after the worker died"
        assert time.monotonic() - killed_at < 10
        status, body = results["full"]
        assert 500 <= status < 600 and body["error"]["code"] == status
        status, events = results["stream"]
        assert status == 200 and events[-1] == "[DONE]"
        assert 500 <= json.loads(events[-2])["error"]["code"] < 600
        assert health in (None, 503)
        assert server.proc.wait(10) == 1
        assert "tensor-parallel worker" in server.log_text()
        assert _wait_gone(tree, 5), "a process of the tree outlived the server"
    finally:
        server.stop(signal.SIGKILL)
        for pid in tree:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
