"""The OpenAI-compatible server, for real: `pagedserve serve` on a free port with the real engine process.

A tiny random-weight Llama with SmolLM2's tokenizer keeps the module fast on 2 CPU cores; its text is
gibberish (often multi-byte pieces), which exercises incremental detokenization well. One server serves the
whole module.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.frontend.model_files import tiny_llama_dir
from tests.frontend.server_process import ServerProcess

API_KEY = "test-key"
MODEL = "tiny-llama"
MAX_MODEL_LEN = 2048


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_llama_dir(tmp_path_factory.mktemp("models") / "tiny-llama")
    srv = ServerProcess(str(model), "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                        "--num-gpu-blocks-override", "1024", "--max-num-seqs", "128",
                        "--max-request-body-mb", "1", api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def async_client(server):
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def post(server, path, body, headers=None, **kw):
    return httpx.post(f"{server.url}{path}", json=body, headers=headers if headers is not None else server.headers,
                      timeout=120, **kw)


GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


# ------------------------------------------------------------------------------------------ basics


def test_health_version_models(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completion(server, client):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, **GREEDY)
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    count = post(server, "/tokenize", {"model": MODEL, "messages": MESSAGES}).json()["count"]
    assert resp.usage.prompt_tokens == count
    assert resp.usage.completion_tokens == 8 and resp.usage.total_tokens == count + 8


def test_chat_streaming_matches_non_streaming(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=12, **GREEDY)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_streaming_matches_non_streaming(client):
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, **GREEDY)
    assert full.object == "text_completion" and full.usage.completion_tokens == 12
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_sse_wire_format_ends_with_done(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=server.headers, timeout=60,
                      json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=server.headers, timeout=60,
                      json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_n_choices_stream_and_not(client):
    kw = dict(model=MODEL, prompt="The weather", max_tokens=6, n=2, temperature=1.0, seed=11,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert sorted(c.index for c in full.choices) == [0, 1]
    assert full.usage.completion_tokens == 12
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in full.choices}
    assert full.choices[0].text != full.choices[1].text  # distinct samples, not copies
    chat_kw = dict(model=MODEL, messages=MESSAGES, max_tokens=6, n=2, temperature=1.0, seed=5,
                   extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(**chat_kw)
    chat_texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(stream=True, **chat_kw):
        for c in chunk.choices:
            chat_texts[c.index] += c.delta.content or ""
    assert chat_texts == {c.index: c.message.content for c in chat.choices}


def test_batch_of_prompts(client):
    resp = client.completions.create(model=MODEL, prompt=["A", "B c", "D"], max_tokens=4, n=2, **GREEDY)
    assert [c.index for c in resp.choices] == list(range(6))
    ids = client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5]], max_tokens=4, **GREEDY)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5
    single = client.completions.create(model=MODEL, prompt="B c", max_tokens=4, **GREEDY)
    assert resp.choices[2].text == single.choices[0].text


# ------------------------------------------------------------------------------------------ sampling features


def test_completion_logprobs(client):
    resp = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, logprobs=3, **GREEDY)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token_lp <= 0.0 and 1 <= len(top) <= 4
        assert top[token] == pytest.approx(token_lp)
        assert token_lp == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, logprobs=True,
                                          top_logprobs=2, **GREEDY)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.bytes == list(entry.token.encode("utf-8", errors="replace"))
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, logprobs=True,
                                            top_logprobs=2, stream=True, **GREEDY)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_echo_with_logprobs(client):
    prompt = "Echo this prompt"
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1, **GREEDY)
    choice = resp.choices[0]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, **GREEDY)
    assert choice.text == prompt + plain.choices[0].text
    n_prompt = resp.usage.prompt_tokens
    assert len(choice.logprobs.tokens) == n_prompt + 3
    assert choice.logprobs.token_logprobs[0] is None
    assert all(x is not None for x in choice.logprobs.token_logprobs[1:])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, echo=True, stream=True, **GREEDY) if c.choices)
    assert streamed == choice.text


def _token_boundary_stop(client, prompt):
    """A stop string straddling two generated tokens, and the text expected before it."""
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, logprobs=0, **GREEDY)
    text, lp = resp.choices[0].text, resp.choices[0].logprobs
    for k in range(2, len(lp.tokens) - 1):
        a, b = lp.tokens[k - 1], lp.tokens[k]
        if len(a) >= 2 and len(b) >= 2 and (a + b).isascii() and "\ufffd" not in text[:lp.text_offset[k] + 2]:
            stop = a[-2:] + b[:2]
            cut = text.find(stop)
            if cut >= 0:
                return stop, text[:cut]
    pytest.skip("no clean token boundary in this model's output")


def test_stop_string_across_tokens(server, client):
    stop, expected = _token_boundary_stop(client, "Stop strings")
    resp = client.completions.create(model=MODEL, prompt="Stop strings", max_tokens=24, stop=[stop], **GREEDY)
    assert resp.choices[0].text == expected and resp.choices[0].finish_reason == "stop"
    raw = post(server, "/v1/completions", {"model": MODEL, "prompt": "Stop strings", "max_tokens": 24,
                                           "stop": stop, "temperature": 0, "ignore_eos": True}).json()
    assert raw["choices"][0]["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Stop strings", max_tokens=24, stop=[stop], stream=True, **GREEDY) if c.choices)
    assert streamed == expected
    incl = client.completions.create(model=MODEL, prompt="Stop strings", max_tokens=24, stop=[stop],
                                     temperature=0.0, extra_body={"ignore_eos": True,
                                                                  "include_stop_str_in_output": True})
    assert incl.choices[0].text == expected + stop


def test_stop_token_ids_and_min_tokens(server):
    body = {"model": MODEL, "prompt": "Tokens", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    first = post(server, "/v1/completions", {**body, "logprobs": 0}).json()["choices"][0]
    tokens = post(server, "/tokenize", {"prompt": first["text"], "add_special_tokens": False}).json()["tokens"]
    stop_id = tokens[2]
    hit = post(server, "/v1/completions", {**body, "stop_token_ids": [stop_id]}).json()
    assert hit["choices"][0]["finish_reason"] == "stop" and hit["choices"][0]["stop_reason"] == stop_id
    assert hit["usage"]["completion_tokens"] <= 3
    held = post(server, "/v1/completions", {**body, "stop_token_ids": [stop_id], "min_tokens": 6}).json()
    assert held["usage"]["completion_tokens"] >= 6


def test_seed_reproducible_and_extras_accepted(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=1.0,
              extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True})
    a = client.chat.completions.create(seed=123, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=123, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=321, **kw).choices[0].message.content
    assert a == b and a != c


def test_tokenize_detokenize_round_trip(server):
    r = post(server, "/tokenize", {"model": MODEL, "prompt": "Hello, wörld! 😀", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_MODEL_LEN
    assert len(r["token_strs"]) == r["count"]
    back = post(server, "/detokenize", {"model": MODEL, "tokens": r["tokens"]}).json()
    assert back["prompt"] == "Hello, wörld! 😀"


def test_metrics_after_traffic(server, client):
    before = server.metric("vllm:generation_tokens_total", model_name=MODEL)
    client.completions.create(model=MODEL, prompt="Count me", max_tokens=5, **GREEDY)
    m = server.metrics()
    names = {k.split("{")[0] for k in m}
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count"]:
        assert name in names, name
    assert server.metric("vllm:generation_tokens_total", model_name=MODEL) == before + 5
    assert server.metric("vllm:prompt_tokens_total") > 0
    assert server.metric("vllm:prefix_cache_queries_total") > 0
    assert server.metric("vllm:e2e_request_latency_seconds_count") >= 1


def test_api_process_froze_its_heap_and_watches_its_loop(server):
    """Once started, the API process froze its startup heap (no GC rescans it) and its loop-lag monitor ticks."""
    assert server.metric("pagedserve:api_gc_frozen_objects") > 10_000
    ticks = server.metric("pagedserve:event_loop_lag_seconds_count")
    time.sleep(0.3)
    assert server.metric("pagedserve:event_loop_lag_seconds_count") > ticks > 0


def test_prefix_cache_hits_visible(server, client):
    prompt = "A long shared prefix " * 12  # several full 16-token blocks
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY)
    hits = server.metric("vllm:prefix_cache_hits_total")
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY)
    assert server.metric("vllm:prefix_cache_hits_total") >= hits + 16


def _new_prefix_hits(server, send) -> float:
    before = server.metric("vllm:prefix_cache_hits_total")
    send()
    return server.metric("vllm:prefix_cache_hits_total") - before


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_cache_salt_isolates_prefix_cache(server, client, endpoint):
    text = f"Tenant data for the {endpoint} endpoint, not to be shared. " * 8  # several full 16-token blocks

    def send(salt=None):
        extra = {**GREEDY["extra_body"], **({"cache_salt": salt} if salt is not None else {})}
        if endpoint == "completions":
            return lambda: client.completions.create(model=MODEL, prompt=text, max_tokens=2, temperature=0.0,
                                                     extra_body=extra)
        # Our own system message: the template's default one is in the cache already, shared by every chat.
        messages = [{"role": "system", "content": text}, {"role": "user", "content": "Hi"}]
        return lambda: client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0.0,
                                                      extra_body=extra)

    assert _new_prefix_hits(server, send("tenant-a")) == 0  # first sight of this prompt
    assert _new_prefix_hits(server, send("tenant-b")) == 0  # same prompt, other salt: no hit
    assert _new_prefix_hits(server, send()) == 0  # unsalted requests do not see salted blocks either
    assert _new_prefix_hits(server, send("tenant-a")) >= 16 * 3  # same salt: the prompt's blocks are reused


# ------------------------------------------------------------------------------------------ errors


def _long_prompt(n_tokens):
    return " ".join(["hello"] * n_tokens)


BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": "not a list"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": _long_prompt(MAX_MODEL_LEN + 10)}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": _long_prompt(MAX_MODEL_LEN + 10)}]},
     "messages"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": MAX_MODEL_LEN},
     "max_completion_tokens"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1.0}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("/v1/completions", {"prompt": "x", "cache_salt": ""}, "cache_salt"),
    ("/v1/chat/completions", {"messages": MESSAGES, "cache_salt": ""}, "cache_salt"),
]


def _assert_error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS, ids=[f"{p[0]}-{p[2]}-{i}" for i, p in
                                                                 enumerate(BAD_REQUESTS)])
def test_bad_request_is_400(server, path, body, param):
    _assert_error(post(server, path, body), 400, param)


def test_invalid_json_is_400(server):
    resp = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=30,
                      headers={**server.headers, "content-type": "application/json"})
    _assert_error(resp, 400)


def test_auth(server):
    body = {"prompt": "x", "max_tokens": 1}
    _assert_error(post(server, "/v1/completions", body, headers={}), 401)
    _assert_error(post(server, "/v1/completions", body, headers={"Authorization": "Bearer wrong"}), 401)
    _assert_error(httpx.get(f"{server.url}/v1/models"), 401)
    assert post(server, "/v1/completions", body).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # health stays open


def test_unknown_route_is_404(server):
    _assert_error(httpx.get(f"{server.url}/v1/nothing-here", headers=server.headers), 404)
    _assert_error(post(server, "/v2/completions", {}), 404)


def test_oversize_body_is_413(server):
    big = {"prompt": "x" * (2 * 1024 * 1024), "max_tokens": 1}
    _assert_error(post(server, "/v1/completions", big), 413)


def test_server_still_serves_after_errors(server, client):
    for path, body, _ in BAD_REQUESTS[:5]:
        post(server, path, body)
    assert httpx.get(f"{server.url}/health").status_code == 200
    resp = client.completions.create(model=MODEL, prompt="still alive", max_tokens=3, **GREEDY)
    assert resp.usage.completion_tokens == 3


# ------------------------------------------------------------------------------------------ disconnects, load


def _wait_for(predicate, timeout_s=20.0, interval_s=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    assert _wait_for(lambda: server.metric("vllm:num_requests_running") == 0)
    aborted_before = server.metric("vllm:request_success_total", finished_reason="abort")
    generated_before = server.metric("vllm:generation_tokens_total")
    max_tokens = MAX_MODEL_LEN - 16
    body = {"model": MODEL, "prompt": "A long story", "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=60) as r:
        chunks = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks += 1
            if chunks == 3:
                assert server.metric("vllm:kv_cache_usage_perc") > 0
                assert server.metric("vllm:num_requests_running") == 1
                break  # leaving the iterator closes the connection
    # Connection closed: the request is aborted in the core and its blocks return.
    assert _wait_for(lambda: server.metric("vllm:request_success_total", finished_reason="abort")
                     == aborted_before + 1)
    assert _wait_for(lambda: server.metric("vllm:kv_cache_usage_perc") == 0.0
                     and server.metric("vllm:num_requests_running") == 0)
    assert server.metric("vllm:generation_tokens_total") - generated_before < max_tokens


def test_disconnect_non_streaming_aborts(server):
    aborted_before = server.metric("vllm:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": "Another long story", "max_tokens": MAX_MODEL_LEN - 16, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=1.0)
    assert _wait_for(lambda: server.metric("vllm:request_success_total", finished_reason="abort")
                     == aborted_before + 1)
    assert _wait_for(lambda: server.metric("vllm:kv_cache_usage_perc") == 0.0)


def test_64_concurrent_streams_match_non_streamed(async_client):
    async def run():
        async def one(i, stream):
            kw = dict(model=MODEL, prompt=f"Request number {i} says", max_tokens=8, temperature=0.8, seed=1000 + i,
                      extra_body={"ignore_eos": True})
            if not stream:
                return (await async_client.completions.create(**kw)).choices[0].text
            text, finish = "", None
            async for chunk in await async_client.completions.create(stream=True, **kw):
                for c in chunk.choices:
                    text += c.text
                    finish = c.finish_reason or finish
            assert finish == "length"
            return text

        streamed = await asyncio.gather(*(one(i, True) for i in range(64)))
        full = await asyncio.gather(*(one(i, False) for i in range(64)))
        return streamed, full

    streamed, full = asyncio.run(run())
    assert streamed == full
    assert len(set(full)) > 32  # different seeds, different texts
