"""Issue 17's reproductions against a live server, each bounded in time, plus a property-based fuzz run.

Every reproduction once killed, hung or starved the server; now each is a quick 4xx and the server keeps
answering (``/health`` within 100 ms, a canary greedy request unchanged). One tiny-model server serves the module.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.frontend.model_files import tiny_llama_dir
from tests.frontend.server_process import ServerProcess

MODEL = "tiny-llama"
MAX_MODEL_LEN = 512
HUGE = 2**63
FAULT_MARKER = [31337, 31338, 31339]  # a prompt holding this token-id run makes an engine step raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_llama_dir(tmp_path_factory.mktemp("models") / "tiny-llama")
    srv = ServerProcess(str(model), "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                        "--num-gpu-blocks-override", "256", "--max-request-body-mb", "24",
                        "--timeout-request-headers", "1", "--timeout-keep-alive", "1",
                        env={"PAGEDSERVE_TEST_STEP_FAULT_TOKENS": ",".join(map(str, FAULT_MARKER))})
    yield srv
    srv.stop()


def post(server, path, body, timeout=30):
    return httpx.post(f"{server.url}{path}", json=body, timeout=timeout)


def canary(server) -> str:
    r = post(server, "/v1/completions", {"prompt": "Hello there", "max_tokens": 6, "temperature": 0,
                                         "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


_PROBE_SCRIPT = r"""
import json, sys, threading, time
import httpx
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
worst, failures = 0.0, []
with httpx.Client(timeout=5) as client:
    print("ready", flush=True)
    while not stop.is_set():
        start = time.monotonic()
        try:
            status = client.get(sys.argv[1]).status_code
            if status != 200:
                failures.append(status)
        except httpx.HTTPError as exc:
            failures.append(repr(exc))
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.02)
print(json.dumps({"worst": worst, "failures": failures[:10]}), flush=True)
"""


class HealthProbe:
    """Polls /health from a separate process while a test runs, and records the slowest answer. A process, not a
    thread: this test process's own work (encoding bodies, generating examples) holds its GIL and would count
    against the server."""

    def __init__(self, server) -> None:
        self.url = f"{server.url}/health"
        self.worst = 0.0
        self.failures: list[object] = []

    def __enter__(self) -> "HealthProbe":
        self._proc = subprocess.Popen([sys.executable, "-c", _PROBE_SCRIPT, self.url], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *exc) -> None:
        out, _ = self._proc.communicate(input="", timeout=30)
        result = json.loads(out.strip().splitlines()[-1])
        self.worst, self.failures = result["worst"], result["failures"]


# ------------------------------------------------------------------------------------------ must not kill the core


@pytest.mark.parametrize("body,param", [
    ({"prompt": "Hi", "max_tokens": 4, "temperature": 1, "top_k": 9223372036854775808}, "top_k"),
    ({"prompt": "Hi", "max_tokens": 4, "stop_token_ids": [1000000000], "min_tokens": 2}, "stop_token_ids"),
    ({"prompt": "Hi", "max_tokens": 4, "stop_token_ids": [HUGE], "min_tokens": 2}, "stop_token_ids"),
    ({"prompt": "Hi", "max_tokens": 4, "min_tokens": 2**70}, "min_tokens"),
    ({"prompt": [1, 2, 2**64]}, "prompt"),
    ({"prompt": "Hi", "logprobs": HUGE}, "logprobs"),
    ({"prompt": "Hi", "n": 2**70}, "n"),
    ({"prompt": "Hi", "n": 129}, "n"),
    ({"prompt": ["Hi"] * 2049, "max_tokens": 1}, "prompt"),
])
def test_hostile_values_are_400_and_the_engine_survives(server, body, param):
    start = time.monotonic()
    assert_openai_error(post(server, "/v1/completions", body), 400, param)
    assert time.monotonic() - start < 2.0
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_failed_requests_release_their_ids(server):
    """A request refused at any stage leaves nothing behind: its id is free again at once."""
    for body in ({"top_k": HUGE}, {"stop_token_ids": [10**9]}, {"n": 2**70}, {"prompt": [HUGE]}):
        r = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "request_id": "reused", **body})
        assert r.status_code == 400, r.text
    r = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "request_id": "reused"})
    assert r.status_code == 200, r.text
    r = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "request_id": "reused"})
    assert r.status_code == 200, r.text


def test_unknown_model_is_404_everywhere(server):
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/tokenize", {"prompt": "x"})):
        err = assert_openai_error(post(server, path, {"model": "no-such-model", **body}), 404, "model")
        assert err["code"] == "model_not_found"


def test_a_failing_engine_step_fails_only_its_request(server):
    """An exception inside an engine step (injected for prompts holding FAULT_MARKER) fails that request with an
    OpenAI-shaped 500 (an error event on a stream); concurrent requests in the same steps, and later ones, succeed
    with the text they give alone, and no block leaks."""
    good = [{"prompt": [100 + i, 200 + i, 300 + i], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            for i in range(4)]
    alone = [post(server, "/v1/completions", body).json()["choices"][0]["text"] for body in good]
    bad = {"prompt": [5, *FAULT_MARKER, 6], "max_tokens": 12, "ignore_eos": True}

    def stream_text(r: httpx.Response) -> tuple[str, list[dict]]:
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", r.text[-300:]
        parsed = [json.loads(e) for e in events[:-1]]
        return "".join(c["text"] for e in parsed if "choices" in e for c in e["choices"]), \
            [e["error"] for e in parsed if "error" in e]

    with ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(post, server, "/v1/completions", body) for body in good]
        good_streams = [pool.submit(post, server, "/v1/completions", {**body, "stream": True}) for body in good[:2]]
        bad_plain = pool.submit(post, server, "/v1/completions", bad)
        bad_stream = pool.submit(post, server, "/v1/completions", {**bad, "stream": True})
        err = assert_openai_error(bad_plain.result(), 500)
        assert "injected step fault" in err["message"] and err["type"] == "InternalServerError"
        text, errors = stream_text(bad_stream.result())
        assert len(errors) == 1 and errors[0]["code"] == 500 and "injected step fault" in errors[0]["message"]
        assert [f.result().json()["choices"][0]["text"] for f in goods] == alone
        assert [stream_text(f.result()) for f in good_streams] == [(t, []) for t in alone[:2]]
    assert [post(server, "/v1/completions", body).json()["choices"][0]["text"] for body in good[:2]] == alone[:2]
    # The failed request's id is free again at once.
    assert_openai_error(post(server, "/v1/completions", {**bad, "request_id": "faulty"}), 500)
    r = post(server, "/v1/completions", {**good[0], "request_id": "faulty"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone[0]
    assert httpx.get(f"{server.url}/health").status_code == 200
    deadline = time.monotonic() + 5
    while server.metric("vllm:kv_cache_usage_perc") != 0.0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("vllm:kv_cache_usage_perc") == 0.0
    assert server.metric("vllm:num_requests_running") == 0 and server.metric("vllm:num_requests_waiting") == 0


# ------------------------------------------------------------------------------------------ must not starve others


def test_big_inputs_are_refused_before_tokenizing_and_health_stays_fast(server):
    big = "hello world " * 700_000  # 8.4 MB
    # Bodies are encoded before the probe starts: JSON-encoding 8 MB here holds this process's GIL for tens of
    # milliseconds, which the probe thread would count against the server.
    requests = [(path, json.dumps(body).encode(), param) for path, body, param in (
        ("/v1/completions", {"prompt": big, "max_tokens": 1}, "prompt"),
        ("/tokenize", {"prompt": big[:8_000_000]}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}, "messages"),
        ("/v1/completions", {"prompt": list(range(1, 100_001)), "max_tokens": 1}, "prompt"))]
    # Up to the body limit (24 MB here): 20 MB of text is refused by its length; millions of small JSON values
    # (2.5 M token ids, 500,000 messages) are refused (413) before parsing, which would hold the event loop.
    huge = "hello world " * 1_700_000
    requests += [(path, json.dumps(body).encode(), status) for path, body, status in (
        ("/v1/completions", {"prompt": huge, "max_tokens": 1}, 400),
        ("/tokenize", {"prompt": huge}, 400),
        ("/v1/completions", {"prompt": list(range(1, 2_500_001)), "max_tokens": 1}, 413),
        ("/detokenize", {"tokens": list(range(1, 2_500_001))}, 413),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 500_000}, 413))]
    with HealthProbe(server) as probe:
        for path, content, param in requests:
            start = time.monotonic()
            r = httpx.post(f"{server.url}{path}", content=content, headers={"Content-Type": "application/json"},
                           timeout=60)
            if param == 413:
                assert "--max-request-json-values" in assert_openai_error(r, 413)["message"]
            else:
                assert_openai_error(r, 400, param if isinstance(param, str) else "prompt")
            assert time.monotonic() - start < 10
    # Tokenizing one of these prompts would hold the event loop for seconds; the 413s are checked by status above.
    # The bound leaves room for the 2-core CI box, shared by this process, the probe and the server (worst answers of
    # 0.13-0.17 s seen there with nothing blocking, and 0.28 s once in a fresh-clone run of the suite).
    assert not probe.failures and probe.worst < 0.5, (probe.worst, probe.failures[:3])


def test_request_chat_template_is_refused_without_the_flag(server):
    body = {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 'x' * 50000000 }}"}
    start = time.monotonic()
    err = assert_openai_error(post(server, "/v1/chat/completions", body), 400, "chat_template")
    assert "--trust-request-chat-template" in err["message"] and time.monotonic() - start < 2
    assert_openai_error(post(server, "/tokenize", body), 400, "chat_template")


# ------------------------------------------------------------------------------------------ connections


def test_idle_and_slow_loris_connections_are_closed(server):
    host, port = "127.0.0.1", server.port
    idle = socket.create_connection((host, port))
    slow = socket.create_connection((host, port))
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the head never completes
    for sock in (idle, slow):
        sock.settimeout(5)
        start = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - start < 4
        sock.close()


# ------------------------------------------------------------------------------------------ fuzz

HOSTILE_INTS = st.one_of(st.integers(-3, 3), st.sampled_from([-(2**63) - 1, -1, 0, 2**31, 2**63 - 1, 2**63,
                                                              2**64, 2**70, 10**30]))
HOSTILE_FLOATS = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32),
                           st.sampled_from([1e308, -1e308, 0.0, -0.0]))
NON_FINITE = st.sampled_from(["NaN", "Infinity", "-Infinity"])  # raw JSON tokens, spliced in below
SCALARS = st.one_of(st.none(), st.booleans(), HOSTILE_INTS, HOSTILE_FLOATS, st.text(max_size=20))


def _deep(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


ANY_VALUE = st.one_of(SCALARS, st.lists(SCALARS, max_size=5), st.builds(_deep, st.integers(50, 900)),
                      st.text(min_size=1000, max_size=5000), st.lists(HOSTILE_INTS, min_size=1, max_size=5))
SAMPLING_FIELDS = ["n", "best_of", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logit_bias", "stop", "stop_token_ids", "ignore_eos",
                   "min_tokens", "max_tokens", "logprobs", "prompt_logprobs", "echo", "stream", "stream_options",
                   "add_special_tokens", "request_id", "cache_salt", "model", "skip_special_tokens"]
CHAT_FIELDS = ["messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
               "chat_template_kwargs", "continue_final_message", "add_generation_prompt", "chat_template"]


@st.composite
def hostile_bodies(draw) -> tuple[str, str]:
    chat = draw(st.booleans())
    if chat:
        body: dict = {"messages": [{"role": "user", "content": draw(st.text(max_size=50))}], "max_tokens": 3}
        fields = SAMPLING_FIELDS + CHAT_FIELDS
    else:
        body = {"prompt": draw(st.one_of(st.text(max_size=50), st.lists(st.integers(-5, 500), max_size=8),
                                         st.lists(HOSTILE_INTS, min_size=1, max_size=3))), "max_tokens": 3}
        fields = SAMPLING_FIELDS + ["prompt", "suffix"]
    for name in draw(st.lists(st.sampled_from(fields), max_size=4, unique=True)):
        body[name] = draw(ANY_VALUE)
    if body.get("stream") is not True:
        body.pop("stream_options", None)
    text = json.dumps(body)
    if draw(st.booleans()):  # a non-finite number where a float goes (Python's json module reads these)
        text = text[:-1] + f', "temperature": {draw(NON_FINITE)}}}'
    return ("/v1/chat/completions" if chat else "/v1/completions"), text


def test_fuzz_hostile_bodies_never_hurt_the_server(server):
    before = canary(server)
    started = time.monotonic()
    client = httpx.Client(timeout=30)
    with HealthProbe(server) as probe:

        @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(hostile_bodies())
        def check(case: tuple[str, str]) -> None:
            if time.monotonic() - started > 60:  # time bound on a slow machine: stop sending, keep the checks
                return
            path, text = case
            r = client.post(f"{server.url}{path}", content=text, headers={"Content-Type": "application/json"})
            assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, text[:300], r.text[:300])
            if r.status_code != 200:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
            elif r.headers["content-type"].startswith("text/event-stream"):
                assert r.text.rstrip().endswith("data: [DONE]")
                assert '"error"' not in r.text or '"code":4' in r.text.replace(" ", ""), r.text[-500:]
            else:
                assert r.json()["choices"] is not None

        check()
    client.close()
    assert not probe.failures, probe.failures[:3]
    assert probe.worst < 0.1, f"/health took {probe.worst * 1000:.0f} ms"
    assert canary(server) == before
    assert not math.isnan(probe.worst)
