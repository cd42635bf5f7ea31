"""vLLM API conformance (issue 20), against one live server with the optional API flags on: token ids in
responses, usage options, prompt truncation and errors, validation wording, the small endpoints and headers,
vLLM's metric names, and an OpenAPI document that describes what the server answers (schemathesis).

The server runs behind ``--root-path /llm`` with an API key, as it would behind a proxy.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.frontend.model_files import tiny_llama_dir
from tests.frontend.server_process import ServerProcess

API_KEY = "conformance-key"
MODEL = "tiny-llama"
MAX_MODEL_LEN = 1024
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_llama_dir(tmp_path_factory.mktemp("models") / "tiny-llama")
    srv = ServerProcess(str(model), "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                        "--num-gpu-blocks-override", "512", "--root-path", "/llm",
                        "--enable-prompt-tokens-details", "--enable-per-request-metrics",
                        "--enable-request-id-headers", "--enable-server-load-tracking",
                        "--enable-tokenizer-info-endpoint", api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server, path, body, headers=None):
    return httpx.post(f"{server.url}{path}", json=body, headers={**server.headers, **(headers or {})}, timeout=120)


def stream_chunks(server, path, body) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, headers=server.headers,
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def tokenize(server, prompt: str) -> list[int]:
    return post(server, "/tokenize", {"prompt": prompt}).json()["tokens"]


def assert_error(resp, status: int, param: str | None, match: str) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["code"] == status
    assert match in error["message"], error["message"]
    return error


# ------------------------------------------------------------------------------------------ token ids


def test_return_token_ids_completion(server):
    prompt = "Once upon a time"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    assert choice["prompt_token_ids"] == tokenize(server, prompt)
    assert len(choice["token_ids"]) == 5
    chunks = stream_chunks(server, "/v1/completions", body)
    streamed = [c["choices"][0] for c in chunks if c["choices"]]
    assert streamed[0]["prompt_token_ids"] == choice["prompt_token_ids"]
    assert all("prompt_token_ids" not in c for c in streamed[1:])
    assert [t for c in streamed for t in c["token_ids"]] == choice["token_ids"]
    # Without the flag the fields stay out of the response.
    plain = post(server, "/v1/completions", {**body, "return_token_ids": False}).json()["choices"][0]
    assert "token_ids" not in plain and "prompt_token_ids" not in plain


def test_return_token_ids_chat(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    resp = post(server, "/v1/chat/completions", body).json()
    assert resp["prompt_token_ids"] == post(server, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
    token_ids = resp["choices"][0]["token_ids"]
    assert len(token_ids) == 4
    assert post(server, "/detokenize", {"tokens": token_ids}).json()["prompt"] == \
        resp["choices"][0]["message"]["content"]
    chunks = stream_chunks(server, "/v1/chat/completions", body)
    assert chunks[0]["prompt_token_ids"] == resp["prompt_token_ids"]
    assert [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids", [])] == token_ids


def test_chat_prompt_token_ids_round_trip(server):
    """The prompt_token_ids a response returns, sent back as the chat prompt: the template is not applied again,
    the same ids reach the model and give the same greedy answer (streaming too)."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    first = post(server, "/v1/chat/completions", body).json()
    again = post(server, "/v1/chat/completions", {**body, "prompt_token_ids": first["prompt_token_ids"]}).json()
    assert again["prompt_token_ids"] == first["prompt_token_ids"]
    assert again["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
    assert again["usage"]["prompt_tokens"] == len(first["prompt_token_ids"])
    # Ids that are not the rendered messages: used as given (the messages only shape the response).
    other = tokenize(server, "Once upon a time")
    plain = post(server, "/v1/completions", {"model": MODEL, "prompt": other, "max_tokens": 4, "temperature": 0.0,
                                             "ignore_eos": True, "return_token_ids": True}).json()
    chunks = stream_chunks(server, "/v1/chat/completions", {**body, "prompt_token_ids": other})
    assert chunks[0]["prompt_token_ids"] == other
    assert [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids", [])] == \
        plain["choices"][0]["token_ids"]
    assert_error(post(server, "/v1/chat/completions", {**body, "prompt_token_ids": [10**7]}), 400,
                 "prompt_token_ids", "out of vocabulary")
    assert_error(post(server, "/v1/chat/completions", {**body, "prompt_token_ids": []}), 400,
                 "prompt_token_ids", "empty")


def test_chat_prompt_logprobs_with_echo(server):
    """prompt_logprobs in chat alongside echo: one entry per prompt token (the first None), the prompt's own
    token in each, and the echoed message leading the content."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "temperature": 0.0, "ignore_eos": True,
            "echo": True, "add_generation_prompt": False, "prompt_logprobs": 2, "return_token_ids": True}
    resp = post(server, "/v1/chat/completions", body).json()
    prompt_ids = resp["prompt_token_ids"]
    rows = resp["prompt_logprobs"]
    assert len(rows) == len(prompt_ids) and rows[0] is None
    for token_id, row in zip(prompt_ids[1:], rows[1:]):
        assert str(token_id) in row and 1 <= len(row) <= 3
    message = resp["choices"][0]["message"]
    assert message["role"] == "user" and message["content"].startswith(MESSAGES[-1]["content"])
    assert_error(post(server, "/v1/chat/completions", {**body, "stream": True}), 400, "prompt_logprobs", "stream")


def test_continue_final_message_with_echo(server):
    """vLLM's chat echo test: the final assistant message is continued, and echoed in front of the new text."""
    saying = "Here is a common saying about apple. An apple a day, keeps"
    messages = [{"role": "user", "content": "tell me a common saying"}, {"role": "assistant", "content": saying}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True,
            "echo": True, "continue_final_message": True, "add_generation_prompt": False, "return_token_ids": True}
    resp = post(server, "/v1/chat/completions", body).json()
    choice = resp["choices"][0]
    assert choice["message"]["role"] == "assistant"
    generated = post(server, "/detokenize", {"tokens": choice["token_ids"]}).json()["prompt"]
    assert choice["message"]["content"] == saying + generated
    # The prompt ends with the open message: no end-of-turn token after the saying.
    rendered = post(server, "/detokenize", {"tokens": resp["prompt_token_ids"]}).json()["prompt"]
    assert rendered.rstrip().endswith(saying)
    chunks = stream_chunks(server, "/v1/chat/completions", body)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == choice["message"]["content"]


def test_return_tokens_as_token_ids(server):
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 3, "temperature": 0.0, "ignore_eos": True,
            "logprobs": 2, "return_tokens_as_token_ids": True, "return_token_ids": True}
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(k.startswith("token_id:") for top in choice["logprobs"]["top_logprobs"] for k in top)
    chat = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 3,
                                                 "temperature": 0.0, "logprobs": True, "top_logprobs": 2,
                                                 "return_tokens_as_token_ids": True,
                                                 "return_token_ids": True}).json()["choices"][0]
    content = chat["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{t}" for t in chat["token_ids"]]
    assert all(len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["token"].startswith("token_id:")
               for c in content)


def test_completion_top_logprobs_count_vllm_rule(server):
    """top_logprobs holds N entries, N+1 when the sampled token is outside the top N."""
    body = {"model": MODEL, "prompt": "The weather", "max_tokens": 8, "temperature": 1.0, "seed": 3,
            "ignore_eos": True, "logprobs": 1, "return_token_ids": True}
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    tops = choice["logprobs"]["top_logprobs"]
    assert all(len(top) in (1, 2) for top in tops)
    assert all(tok in top for tok, top in zip(choice["logprobs"]["tokens"], tops))


# ------------------------------------------------------------------------------------------ usage


def test_stream_options_empty_sends_no_usage(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream_options": {}}
    chunks = stream_chunks(server, "/v1/completions", body)
    assert all(c.get("usage") is None for c in chunks) and all(c["choices"] for c in chunks)
    chunks = stream_chunks(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 3,
                                                            "stream_options": {"include_usage": False}})
    assert all(c.get("usage") is None for c in chunks)


def test_continuous_usage_stats(server):
    chunks = stream_chunks(server, "/v1/completions", {
        "model": MODEL, "prompt": "Hi there", "max_tokens": 4, "temperature": 0.0, "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert all(c["usage"] is not None for c in chunks)
    completion_counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert completion_counts == sorted(completion_counts) and completion_counts[-1] == 4
    assert chunks[-1]["choices"] == []


def test_prompt_tokens_details_cached_tokens(client):
    prompt = "A shared prefix for the cached tokens test, long enough for full blocks. " * 6
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 and cached % 16 == 0 and cached < second.usage.prompt_tokens


def test_per_request_metrics(server):
    resp = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 4,
                                                 "ignore_eos": True}).json()
    m = resp["metrics"]
    assert 0 < m["time_to_first_token_s"] <= m["e2e_latency_s"] and m["mean_inter_token_latency_s"] > 0
    chunks = stream_chunks(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3,
                                                       "ignore_eos": True,
                                                       "stream_options": {"include_usage": True}})
    assert "metrics" in chunks[-1] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all("metrics" not in c for c in chunks[:-1])


# ------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize("side", ["left", "right", None])
def test_truncate_prompt_tokens(server, side):
    prompt = "one two three four five six seven eight nine ten"
    ids = tokenize(server, prompt)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "truncate_prompt_tokens": 4,
            "return_token_ids": True}
    if side is not None:
        body["truncation_side"] = side
    resp = post(server, "/v1/completions", body).json()
    assert resp["usage"]["prompt_tokens"] == 4
    assert resp["choices"][0]["prompt_token_ids"] == (ids[:4] if side == "right" else ids[-4:])


def test_truncate_prompt_tokens_chat_and_bounds(server):
    resp = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 1,
                                                 "truncate_prompt_tokens": 5}).json()
    assert resp["usage"]["prompt_tokens"] == 5
    assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "truncate_prompt_tokens":
                                                  MAX_MODEL_LEN + 1}), 400, "truncate_prompt_tokens",
                 "greater than max_model_len")


@pytest.mark.parametrize("prompt", ["", [], [[]]])
def test_empty_prompt_error(server, prompt):
    assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1}), 400,
                 "prompt", "Either prompt or prompt_embeds must be provided and non-empty.")


def test_out_of_vocab_token_ids_error(server):
    assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": [1, 999999], "max_tokens": 1}), 400,
                 "prompt", "Token id 999999 is out of vocabulary")


# ------------------------------------------------------------------------------------------ validation


def test_logit_bias_validation_messages(server):
    assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}), 400,
                 "logit_bias", "token_id must be an integer or string representing an integer")
    error = assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x",
                                                          "logit_bias": {"99999999": 1}}),
                         400, "logit_bias", "out-of-vocab token ids")
    assert "Vocabulary size: " in error["message"]


@pytest.mark.parametrize("seed,bound", [(2**63, "9223372036854775807"), (-(2**63) - 1, "-9223372036854775808")])
def test_seed_outside_int64(server, seed, bound):
    assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "seed": seed}), 400, "seed", bound)


def test_beam_search_is_400(server):
    for path, body in [("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": MESSAGES})]:
        assert_error(post(server, path, {"model": MODEL, **body, "use_beam_search": True}), 400, "use_beam_search",
                     "use_beam_search")


def contains_run(ids: list[int], run: list[int]) -> bool:
    return any(ids[i:i + len(run)] == run for i in range(len(ids) - len(run) + 1))


def test_allowed_token_ids_limit_what_is_sampled(server):
    allowed = tokenize(server, "Paris London Rome")[-4:]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.5, "seed": 3,
            "ignore_eos": True, "allowed_token_ids": allowed, "return_token_ids": True}
    ids = post(server, "/v1/completions", body).json()["choices"][0]["token_ids"]
    assert len(ids) == 12 and set(ids) <= set(allowed)
    chunks = stream_chunks(server, "/v1/chat/completions", {**{k: v for k, v in body.items() if k != "prompt"},
                                                            "messages": MESSAGES})
    streamed = [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids") or []]
    assert len(streamed) == 12 and set(streamed) <= set(allowed)
    assert_error(post(server, "/v1/completions", {**body, "allowed_token_ids": [10**7]}), 400, "allowed_token_ids",
                 "out-of-vocab")
    assert_error(post(server, "/v1/completions", {**body, "allowed_token_ids": []}), 400, "allowed_token_ids", "empty")


def test_bad_words_are_never_generated(server):
    """Words taken from the greedy output (one spelled with one token, one with several) are banned: no spelling
    of them appears, and the output changes. Spellings follow vLLM: the word without its leading space, and after
    a space when that gives a different first token and the same length."""
    body = {"model": MODEL, "prompt": "The weather today is", "max_tokens": 10, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    baseline = post(server, "/v1/completions", body).json()["choices"][0]["token_ids"]

    def spellings(word: str) -> list[list[int]]:
        bare, spaced = (post(server, "/tokenize", {"prompt": p, "add_special_tokens": False}).json()["tokens"]
                        for p in (word, " " + word))
        return [bare] + ([spaced] if spaced[0] != bare[0] and len(spaced) == len(bare) else [])

    found = {}  # spelling length class (1 or more) -> a word whose spelling is in the baseline
    for width in (1, 2, 3):
        for i in range(len(baseline) - width + 1):
            word = post(server, "/detokenize", {"tokens": baseline[i:i + width]}).json()["prompt"].strip()
            runs = spellings(word) if word else []
            hit = [r for r in runs if contains_run(baseline, r)]
            if hit and min(len(r) > 1 for r in hit) not in found:
                found[min(len(r) > 1 for r in hit)] = (word, runs)
    assert found, baseline
    for word, runs in found.values():
        ids = post(server, "/v1/completions", {**body, "bad_words": [word]}).json()["choices"][0]["token_ids"]
        assert len(ids) == 10 and ids != baseline
        assert not any(contains_run(ids, run) for run in runs), (word, runs, ids)
    assert post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 3,
                                                 "bad_words": ["Paris"]}).status_code == 200


def test_logprob_token_ids(server):
    """vLLM's logprob_token_ids: each position reports the requested ids (in place of the top-N) and the sampled
    token, inside the set or not; their values match the full distribution's. Streaming too."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0.0, "ignore_eos": True,
            "logprobs": 5, "return_tokens_as_token_ids": True}
    plain = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    top5 = plain["top_logprobs"][0]
    ranked = sorted(top5, key=top5.get, reverse=True)
    second, fourth = (int(t.split(":")[1]) for t in (ranked[1], ranked[3]))
    outside = 7  # an id far from the top: its logprob comes back all the same
    requested = [fourth, second, outside]
    got = post(server, "/v1/completions", {**body, "logprobs": 1, "logprob_token_ids": requested}).json()
    lp = got["choices"][0]["logprobs"]
    assert lp["tokens"] == plain["tokens"]
    for pos, (token, top) in enumerate(zip(lp["tokens"], lp["top_logprobs"])):
        assert set(top) == {token} | {f"token_id:{t}" for t in requested}
        assert top[token] == pytest.approx(lp["token_logprobs"][pos], abs=1e-4)
    first = lp["top_logprobs"][0]
    for tid in (second, fourth):
        assert first[f"token_id:{tid}"] == pytest.approx(top5[f"token_id:{tid}"], abs=1e-4)
    assert first[f"token_id:{outside}"] < min(top5.values())
    chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "temperature": 0.0, "logprobs": True,
            "top_logprobs": 2, "logprob_token_ids": requested, "return_tokens_as_token_ids": True}
    content = post(server, "/v1/chat/completions", chat).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    assert all([e["token"] for e in c["top_logprobs"]] == [f"token_id:{t}" for t in requested] for c in content)
    chunks = stream_chunks(server, "/v1/chat/completions", chat)
    streamed = [e for c in chunks if c["choices"] and c["choices"][0].get("logprobs")
                for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    for e, c in zip(streamed, content):
        assert [t["token"] for t in e["top_logprobs"]] == [f"token_id:{t}" for t in requested]
        assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx([t["logprob"] for t in c["top_logprobs"]],
                                                                           abs=1e-4)
    assert_error(post(server, "/v1/completions", {**body, "logprobs": None, "logprob_token_ids": [1]}), 400,
                 "logprob_token_ids", "logprobs")
    assert_error(post(server, "/v1/completions", {**body, "logprob_token_ids": [10**7]}), 400, "logprob_token_ids",
                 "out-of-vocab")


def test_minus_one_logprobs_over_max_logprobs_is_400(server):
    """-1 means the whole vocabulary (vLLM); with the default --max-logprobs 20 that is refused, naming the field."""
    for path, body, field in [
        ("/v1/completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
        ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ]:
        assert_error(post(server, path, {"model": MODEL, **body}), 400, field, "whole vocabulary")


# ------------------------------------------------------------------------------------------ endpoints, headers


def test_version_and_tokenizer_info(server):
    assert httpx.get(f"{server.url}/version").json()["version"]
    info = httpx.get(f"{server.url}/tokenizer_info", headers=server.headers).json()
    assert isinstance(info["tokenizer_class"], str) and info["tokenizer_class"]
    assert info["eos_token"] == "<|im_end|>" and "chat_template" in info


def test_invocations_routes_by_body(server):
    chat = post(server, "/invocations", {"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
    completion = post(server, "/invocations", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion"
    assert_error(post(server, "/invocations", {"model": MODEL}), 400, "body", "messages")


def test_request_id_headers(server):
    resp = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1},
                headers={"X-Request-Id": "my-request-42"})
    assert resp.headers["x-request-id"] == "my-request-42"
    assert len(httpx.get(f"{server.url}/health").headers["x-request-id"]) == 32  # a fresh id when none is sent


def test_server_load_tracking(server):
    import threading

    assert httpx.get(f"{server.url}/load").json() == {"server_load": 0}
    seen = []
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=server.headers, timeout=60,
                      json={"model": MODEL, "prompt": "Hi", "max_tokens": 40, "ignore_eos": True,
                            "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 2:
                seen.append(httpx.get(f"{server.url}/load").json()["server_load"])
    assert seen == [1]
    assert httpx.get(f"{server.url}/load").json() == {"server_load": 0}
    del threading


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_orca_load_report_header(server, fmt):
    resp = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1},
                headers={"endpoint-load-metrics-format": fmt})
    report = resp.headers["endpoint-load-metrics"]
    if fmt == "text":
        assert report.startswith("TEXT ") and "named_metrics.kv_cache_usage_perc=" in report
    else:
        assert report.startswith("JSON ")
        assert set(json.loads(report[5:])["named_metrics"]) >= {"kv_cache_usage_perc", "num_requests_waiting"}
    plain = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    assert "endpoint-load-metrics" not in plain.headers


def test_root_path_with_api_key(server):
    """Behind the proxy (--root-path /llm): health stays open, the API needs the key."""
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"][0]["id"] == MODEL
    docs = httpx.get(f"{server.url}/openapi.json", headers=server.headers).json()
    assert "/v1/models" in docs["paths"]


# ------------------------------------------------------------------------------------------ metrics


def test_vllm_metric_names_labels_and_counts(server, client):
    before = server.metrics()
    client.completions.create(model=MODEL, prompt="Count me please", max_tokens=6, n=2, temperature=1.0, seed=1,
                              extra_body={"ignore_eos": True})
    after = server.metrics()
    names = {k.split("{")[0] for k in after}
    for name in ["request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds", "time_per_output_token_seconds", "request_params_n",
                 "request_params_max_tokens", "request_max_num_generation_tokens"]:
        assert f"vllm:{name}_count" in names and f"vllm:{name}_bucket" in names, name
    for name in ["vllm:iteration_tokens_total_count", "vllm:cache_config_info", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:request_success_total", "process_cpu_seconds_total",
                 "python_gc_objects_collected_total"]:
        assert name in names, name
    info = next(k for k in after if k.startswith("vllm:cache_config_info"))
    assert 'block_size="16"' in info and 'num_gpu_blocks="512"' in info

    def delta(key_prefix: str) -> float:
        return sum(v for k, v in after.items() if k.startswith(key_prefix)) - \
            sum(v for k, v in before.items() if k.startswith(key_prefix))

    assert delta("vllm:generation_tokens_total") == 12
    assert delta("vllm:request_params_n_count") == 1 and delta("vllm:request_params_n_sum") == 2
    assert delta("vllm:request_params_max_tokens_sum") == 6
    assert delta("vllm:request_max_num_generation_tokens_sum") == 6
    assert delta("vllm:request_success_total") == 1  # one request, whatever its n
    assert delta("vllm:request_queue_time_seconds_count") == 1 and delta("vllm:request_decode_time_seconds_sum") > 0
    labelled = next(k for k in after if k.startswith("vllm:request_queue_time_seconds_count"))
    assert 'model_name="tiny-llama"' in labelled and 'engine="0"' in labelled


# ------------------------------------------------------------------------------------------ OpenAPI


def test_openapi_document_is_consistent(server):
    doc = httpx.get(f"{server.url}/openapi.json", headers=server.headers).json()
    text = json.dumps(doc)
    assert "#/$defs/" not in text
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        name = ref.rsplit("/", 1)[-1]
        assert name in doc["components"]["schemas"], ref
    operation_ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))
    assert "content" not in doc["paths"]["/health"]["get"]["responses"]["200"]
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "default" in doc["paths"]["/tokenize"]["post"]["responses"]


def test_schemathesis_public_routes(server):
    """Fuzz the documented routes (bounded): no server errors, every response matching the schema."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=server.headers)
    failures = []
    cheap = {"/health", "/ping", "/version", "/v1/models", "/load", "/tokenize", "/detokenize", "/tokenizer_info",
             "/metrics"}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path not in cheap:
            continue
        strategy = operation.as_strategy()

        @settings(max_examples=15, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call(base_url=server.url, headers=server.headers, timeout=30)
            case.validate_response(response, checks=(not_a_server_error, response_schema_conformance,
                                                     content_type_conformance))

        from hypothesis import given
        try:
            given(strategy)(run)()
        except Exception as exc:  # collect every route's failure, then report them together
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n".join(failures)
