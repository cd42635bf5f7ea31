"""``--api-server-count 2``: two API processes on one port, one engine core routing each request's outputs to the
process that sent it; plus the stream policy (one SSE event per token when the client keeps up)."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.frontend.model_files import tiny_llama_dir
from tests.frontend.server_process import ServerProcess, child_pids, pid_alive

MODEL = "tiny-llama"
ARGS = ("--served-model-name", MODEL, "--max-model-len", "2048", "--num-gpu-blocks-override", "512",
        "--max-num-seqs", "64", "--api-server-count", "2", "--shutdown-timeout", "2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_llama_dir(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess(model_dir, *ARGS)
    yield srv
    srv.stop()


def _body(prompt: str, max_tokens: int, stream: bool, **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream, **extra}


def _stream_events(url: str, body: dict) -> list[dict | str]:
    events: list[dict | str] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def server_model_dir(srv: ServerProcess) -> str:
    return srv.proc.args[4]  # python -m frontend.cli serve MODEL ...


def _tree(srv: ServerProcess) -> tuple[int, list[int]]:
    """(engine core pid, API process pids) from the launcher's log line."""
    match = re.search(r"engine core pid (\d+); 2 API server processes, pids \[(\d+), (\d+)\]", srv.log_text())
    assert match, srv.log_text()[-3000:]
    return int(match.group(1)), [int(match.group(2)), int(match.group(3))]


def test_requests_land_on_both_processes_and_streams_equal_full_text(server):
    prompts = [f"Story number {i}:" for i in range(24)]

    def one(prompt: str) -> tuple[str, str]:
        full = httpx.post(f"{server.url}/v1/completions", json=_body(prompt, 16, False), timeout=120)
        assert full.status_code == 200
        events = _stream_events(server.url, _body(prompt, 16, True))
        assert events[-1] == "[DONE]"
        streamed = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
        return full.json()["choices"][0]["text"], streamed

    with ThreadPoolExecutor(12) as pool:  # a fresh connection per request: the kernel spreads them
        results = list(pool.map(one, prompts))
    for full, streamed in results:
        assert streamed == full
    metrics = server.metrics()
    per_process = {labels: value for labels, value in metrics.items()
                   if labels.startswith("pagedserve:api_server_requests_total")}
    counts = [v for k, v in per_process.items() if 'api_server="0"' in k or 'api_server="1"' in k]
    assert len(counts) == 2 and all(c > 0 for c in counts), per_process
    assert sum(counts) == 2 * len(prompts)
    # Counters are summed over both processes: every request's success is counted once.
    assert server.metric("vllm:request_success_total") >= 2 * len(prompts)
    assert server.metric("vllm:generation_tokens_total") >= 2 * len(prompts) * 16
    # Each process watches its own event loop; the histogram is the sum of both.
    lag_ticks = {k: v for k, v in metrics.items() if k.startswith("pagedserve:event_loop_lag_seconds_count")}
    assert sum(lag_ticks.values()) > 0, lag_ticks


def test_a_64_token_greedy_stream_arrives_as_64_events(server):
    events = _stream_events(server.url, _body("Once upon a time", 64, True, return_token_ids=True))
    chunks = [e for e in events[:-1] if e["choices"]]
    token_counts = [len(c["choices"][0]["token_ids"]) for c in chunks]
    assert token_counts == [1] * 64, token_counts
    # Plain text streams (the pre-encoded path): never more events than tokens, the same text as unstreamed.
    text_events = _stream_events(server.url, _body("Once upon a time", 64, True))
    texts = [e["choices"][0]["text"] for e in text_events[:-1] if e["choices"]]
    full = httpx.post(f"{server.url}/v1/completions", json=_body("Once upon a time", 64, False), timeout=120)
    assert "".join(texts) == full.json()["choices"][0]["text"] and len(texts) <= 64


def test_disconnects_free_every_block(server):
    def abandon(i: int) -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=_body(f"Go {i}", 1500, True),
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    return  # closes the connection mid-stream

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(abandon, range(8)))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (server.metric("vllm:num_requests_running") == 0 and server.metric("vllm:kv_cache_usage_perc") == 0
                and server.metric("vllm:request_success_total", finished_reason="abort") >= 8):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"blocks not freed: {server.metrics()}")


def test_killing_the_core_fails_both_processes_requests(model_dir):
    srv = ServerProcess(model_dir, *ARGS)
    core, apis = _tree(srv)
    try:
        results: list[object] = []
        started = threading.Semaphore(0)

        def stream(i: int) -> None:
            events = []
            try:
                with httpx.stream("POST", f"{srv.url}/v1/completions", json=_body(f"Tell {i}", 2000, True),
                                  timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            if not events:
                                started.release()
                            events.append(line[6:])
                results.append(events)
            except Exception as exc:  # a dropped connection is a failure of the test
                results.append(exc)
                started.release()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=60)
        served_by = {labels: v for labels, v in srv.metrics().items() if "api_server_requests_total" in labels}
        assert len(served_by) == 2 and all(v > 0 for v in served_by.values()), served_by
        health: list[int] = []
        stop_polling = threading.Event()

        def poll_health() -> None:
            while not stop_polling.is_set():
                try:
                    health.append(httpx.get(f"{srv.url}/health", timeout=2).status_code)
                except httpx.HTTPError:
                    health.append(0)  # the processes have exited
                time.sleep(0.005)

        poller = threading.Thread(target=poll_health)
        os.kill(core, signal.SIGKILL)
        poller.start()
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a request hung after the core died"
        for events in results:
            assert isinstance(events, list) and events[-1] == "[DONE]", events
            assert 500 <= json.loads(events[-2])["error"]["code"] < 600
        assert srv.proc.wait(20) == 1
        stop_polling.set()
        poller.join()
        assert 503 in health and 200 not in health[health.index(503):], health
        assert "The engine core exited" in srv.log_text()
        assert not any(pid_alive(p) for p in apis)
    finally:
        srv.stop(signal.SIGKILL)
        for pid in [core, *apis]:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_bench_serve_against_two_api_processes(server, tmp_path):
    """W5's command line (`pagedserve bench serve` with vLLM's flags) at a small size against --api-server-count 2:
    every request completes, every token arrives in its own event, and the peak tokens/s is reported."""
    from benchmarks.serve import main

    rc = main(["--backend", "vllm", "--base-url", server.url, "--endpoint", "/v1/completions",
               "--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "16",
               "--num-prompts", "24", "--max-concurrency", "12", "--ignore-eos", "--seed", "0",
               "--tokenizer", server_model_dir(server), "--save-result", "--save-detailed", "--no-plots",
               "--result-dir", str(tmp_path), "--result-filename", "run.json", "--disable-tqdm"])
    assert rc == 0
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["completed"] == 24 and data["total_output_tokens"] == 24 * 16
    assert data["max_output_tokens_per_s"] > 0 and data["p99_ttft_ms"] > 0 and data["p99_itl_ms"] > 0
    events = sum(len(itl) + 1 for itl in data["itls"])
    assert events == 24 * 16  # one SSE event per token: nobody fell behind


def test_sigterm_stops_the_whole_tree(server):
    """Last in the module: it stops the module's server."""
    core, apis = _tree(server)
    children = child_pids(server.proc.pid)  # the core, the API processes (and multiprocessing's tracker)
    assert {core, *apis} <= set(children)
    assert server.stop(signal.SIGTERM, timeout_s=60) == 0
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in children)
