"""Server options that need no engine: CORS preflights, the root path, --max-logprobs, --generation-config and
request logging. The app is built without its lifespan, so no engine process starts."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from core.model_source import ModelSource
from frontend.api_server import build_app, uvicorn_config
from frontend.generation_config import default_sampling_overrides
from frontend.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from frontend.request_logger import RequestLogger
from frontend.server_options import ServerOptions
from ipc.config import EngineConfig
from ipc.messages import SamplingParams


def _request(app, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, headers=headers)

    return asyncio.run(go())


def _preflight(app, origin: str) -> httpx.Response:
    return _request(app, "OPTIONS", "/v1/completions",
                    {"Origin": origin, "Access-Control-Request-Method": "POST"})


def test_cors_preflight_from_an_allowed_origin_only():
    options = ServerOptions(allowed_origins=["http://allowed.example"], api_key="secret")
    app = build_app(EngineConfig(served_model_name="m"), None, options)
    ok = _preflight(app, "http://allowed.example")
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "http://allowed.example"
    denied = _preflight(app, "http://other.example")
    assert "access-control-allow-origin" not in denied.headers


def test_cors_default_allows_any_origin_as_vllm_does():
    response = _preflight(build_app(EngineConfig(), None, ServerOptions()), "http://any.example")
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "*"


def test_root_path_and_tls_reach_uvicorn():
    options = ServerOptions(root_path="/api", ssl_keyfile="k.pem", ssl_certfile="c.pem",
                            disable_uvicorn_access_log=True)
    config = uvicorn_config(build_app(EngineConfig(), None, options), options)
    assert (config.root_path, config.ssl_keyfile, config.ssl_certfile) == ("/api", "k.pem", "c.pem")
    assert not config.access_log


# ------------------------------------------------------------------------------------------ --max-logprobs


def test_max_logprobs_rejects_larger_requests():
    with pytest.raises(OpenAIError, match=r"at most 5 \(the server's --max-logprobs\), got 6") as info:
        CompletionRequest(prompt="x", logprobs=6).to_sampling_params(1, 100, max_logprobs=5)
    assert info.value.status_code == 400 and info.value.param == "logprobs"
    with pytest.raises(OpenAIError, match="--max-logprobs") as info:
        CompletionRequest(prompt="x", prompt_logprobs=6).to_sampling_params(1, 100, max_logprobs=5)
    assert info.value.param == "prompt_logprobs"
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=6)
    with pytest.raises(OpenAIError, match="--max-logprobs") as info:
        chat.check(max_logprobs=5)
    assert info.value.param == "top_logprobs"
    assert CompletionRequest(prompt="x", logprobs=30).to_sampling_params(1, 100, max_logprobs=30).logprobs == 30
    assert CompletionRequest(prompt="x", logprobs=50).to_sampling_params(1, 100, max_logprobs=-1).logprobs == 50


# ------------------------------------------------------------------------------------------ --generation-config


def _model_dir(tmp_path, generation: dict):
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return ModelSource(name="m", path=str(tmp_path))


def test_generation_config_auto_reads_the_models_defaults(tmp_path):
    source = _model_dir(tmp_path, {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "max_new_tokens": 7,
                                   "repetition_penalty": 1.0, "eos_token_id": 2})
    defaults = default_sampling_overrides("auto", source)
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 7}  # top_k 50, rep. 1.0: HF's defaults
    assert default_sampling_overrides("vllm", source) == {}
    assert default_sampling_overrides(str(tmp_path), None) == defaults
    assert default_sampling_overrides("auto", ModelSource(name="g", path=str(tmp_path / "nothing"))) == {}
    with pytest.raises(ValueError, match="does not exist"):
        default_sampling_overrides(str(tmp_path / "missing"), source)

    params = CompletionRequest(prompt="x").to_sampling_params(1, 100, defaults)
    assert (params.temperature, params.top_p, params.max_tokens) == (0.6, 0.9, 7)
    explicit = CompletionRequest(prompt="x", temperature=0.0, max_tokens=5).to_sampling_params(1, 100, defaults)
    assert (explicit.temperature, explicit.top_p, explicit.max_tokens) == (0.0, 0.9, 5)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]).to_sampling_params(1, 100, defaults)
    assert (chat.temperature, chat.max_tokens) == (0.6, 7)
    unchanged = CompletionRequest(prompt="x").to_sampling_params(1, 100)
    assert (unchanged.temperature, unchanged.top_p, unchanged.max_tokens) == (1.0, 1.0, 16)


# ------------------------------------------------------------------------------------------ request logging


def test_request_logger_logs_id_length_params_and_truncates(caplog):
    with caplog.at_level(logging.INFO, logger="pagedserve.requests"):
        RequestLogger(max_log_len=3).log("req-1", "abcdefgh", [1, 2, 3, 4, 5], SamplingParams(temperature=0.5))
    (record,) = caplog.records
    message = record.getMessage()
    assert "req-1" in message and "prompt length 5" in message and "temperature=0.5" in message
    assert "'abc'" in message and "[1, 2, 3]" in message and "abcd" not in message


# ------------------------------------------------------------------------------------------ API key, tokenizer_info


def test_api_key_guards_only_v1_routes_as_vllm_does():
    """vLLM's AuthenticationMiddleware: /v1/... needs 'Bearer <key>' (scheme in any case);
    /health, /metrics, /tokenize and the like stay open."""
    app = build_app(EngineConfig(served_model_name="m"), None, ServerOptions(api_key="secret"))
    assert _request(app, "GET", "/v1/models", {}).status_code == 401
    assert _request(app, "GET", "/v1/models", {"Authorization": "Bearer wrong"}).status_code == 401
    assert _request(app, "GET", "/v1/models", {"Authorization": "secret"}).status_code == 401
    for auth in ("Bearer secret", "bearer secret"):
        assert _request(app, "GET", "/v1/models", {"Authorization": auth}).status_code != 401
    for path in ("/version", "/load", "/openapi.json", "/docs"):
        assert _request(app, "GET", path, {}).status_code != 401, path


def test_tokenizer_info_only_with_its_flag():
    plain = build_app(EngineConfig(), None, ServerOptions())
    assert "/tokenizer_info" not in plain.openapi()["paths"]
    enabled = build_app(EngineConfig(), None, ServerOptions(enable_tokenizer_info_endpoint=True))
    assert "/tokenizer_info" in enabled.openapi()["paths"]


def test_api_server_count_flag_and_default(monkeypatch):
    from frontend.cli import serve_parser, server_options_from_args

    options = server_options_from_args(serve_parser().parse_args(["m", "--api-server-count", "3"]))
    assert options.api_server_count == 3 and options.num_api_servers == 3
    with pytest.raises(ValueError, match="--api-server-count must be at least 1"):
        ServerOptions(api_server_count=0)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert ServerOptions().num_api_servers == 1
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert ServerOptions().num_api_servers == 2
    monkeypatch.setattr("os.cpu_count", lambda: 128)
    assert ServerOptions().num_api_servers == 4
