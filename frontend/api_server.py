"""The OpenAI-compatible HTTP server: FastAPI routes, auth, error shapes, and the process's lifecycle.

The engine core starts in the app's lifespan, before uvicorn accepts a connection, and stops in it, so
SIGTERM / Ctrl-C (handled by uvicorn) stop both processes. Every error leaves as OpenAI's
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import secrets
import signal
import socket
import threading
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from frontend.engine_client import EngineClient
from frontend.metrics import CONTENT_TYPE
from frontend.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    OpenAIError,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from frontend.request_logger import RequestLogger
from frontend.server_options import ServerOptions
from frontend.serving_chat import ChatServing
from frontend.serving_common import ServingContext, json_response
from frontend.serving_completion import CompletionServing
from frontend.serving_tokenize import TokenizeServing
from ipc.config import EngineConfig

logger = logging.getLogger("pagedserve.server")

PUBLIC_PATHS = frozenset({"/health", "/ping", "/version", "/metrics"})


def version() -> str:
    try:
        return metadata.version("pagedserve")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code)


# ------------------------------------------------------------------------------------------ middleware


class ApiKeyMiddleware:
    """401 unless ``Authorization: Bearer <key>``; health, version and metrics stay open (vLLM does the same)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in PUBLIC_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = OpenAIError("Unauthorized: a valid API key is required (Authorization: Bearer <key>).",
                                    status_code=401)
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 for a request body over the limit: by its Content-Length, or while it streams in (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> OpenAIError:
        return OpenAIError(f"Request body too large: the limit is {self.max_bytes} bytes.", status_code=413)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_response(self._error())(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions from body reading; the handler below shapes it.
                    raise StarletteHTTPException(413, self._error().message)
            return message

        await self.app(scope, limited_receive, send)


# ------------------------------------------------------------------------------------------ app


def _validation_error(exc: RequestValidationError | ValidationError) -> OpenAIError:
    errors = exc.errors()
    parts, param = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if param is None and loc:
            param = loc[0]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return OpenAIError("Invalid request: " + "; ".join(parts), param=param)


def _parse_body(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _body_schema(model: type[BaseModel]) -> dict:
    """The request body's schema in the OpenAPI document (the route reads the body itself)."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": model.model_json_schema()}}}}


def build_app(engine_config: EngineConfig, tokenizer: Any | None, options: ServerOptions,
              default_sampling: dict[str, Any] | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine core and waits for READY.

    ``default_sampling``: sampling defaults from ``--generation-config`` (``frontend/generation_config.py``).
    """
    served_names = engine_config.served_model_names or [engine_config.model or ""]
    request_logger = RequestLogger(options.max_log_len) if options.enable_log_requests else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = EngineClient(engine_config, tokenizer, served_names[0],
                              startup_timeout_s=options.engine_startup_timeout_s)
        app.state.client = client
        try:
            ready = await client.start()
            if not served_names[0]:
                served_names[0] = ready.model
            ctx = ServingContext(client, tokenizer, served_names, ready.model, ready.max_model_len,
                                 ready.vocab_size, max_logprobs=engine_config.max_logprobs,
                                 default_sampling=default_sampling or {}, request_logger=request_logger,
                                 enable_auto_tool_choice=options.enable_auto_tool_choice,
                                 tool_call_parser=options.tool_call_parser)
            app.state.ctx = ctx
            app.state.completion = CompletionServing(ctx)
            app.state.chat = ChatServing(ctx)
            app.state.tokenize = TokenizeServing(ctx)
            logger.info("pagedserve %s serving %s (max_model_len %d) on http://%s:%d", version(),
                        ", ".join(served_names), ready.max_model_len, options.host or "0.0.0.0", options.port)
            # Everything allocated so far lives as long as the server: keep the cyclic GC from rescanning it
            # (its pauses stall every stream at once).
            gc.collect()
            gc.freeze()
            yield
        finally:
            await client.shutdown()

    app = FastAPI(title="pagedserve", version=version(), lifespan=lifespan)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
        return error_response(OpenAIError(message, status_code=exc.status_code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(OpenAIError(f"Internal server error: {type(exc).__name__}: {exc}", status_code=500))

    @app.get("/health")
    async def health(request: Request) -> Response:
        client: EngineClient = request.app.state.client
        if client.is_healthy:
            return Response(status_code=200)
        return error_response(OpenAIError(client.dead_error or "The engine is not running.", status_code=503))

    app.add_api_route("/ping", health, methods=["GET", "POST"])

    @app.get("/version")
    async def get_version() -> JSONResponse:
        return JSONResponse({"version": version()})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        ctx: ServingContext = request.app.state.ctx
        cards = [ModelCard(id=name, root=ctx.model_path, max_model_len=ctx.max_model_len)
                 for name in ctx.served_model_names]
        return json_response(ModelList(data=cards))

    # The two hot endpoints parse their bodies with pydantic directly: FastAPI's dependency machinery costs
    # ~0.6 ms a request, which at hundreds of requests a second delays every stream's tokens.
    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        body = _parse_body(CompletionRequest, await request.body())
        return await request.app.state.completion.create(body, request)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        body = _parse_body(ChatCompletionRequest, await request.body())
        return await request.app.state.chat.create(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest, request: Request) -> JSONResponse:
        return json_response(request.app.state.tokenize.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
        return json_response(request.app.state.tokenize.detokenize(body))

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.client.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(request: Request) -> Response:
        client: EngineClient = request.app.state.client
        request.app.state.ctx.check_engine()
        ok = await client.call_utility("reset_prefix_cache")
        return JSONResponse({"success": bool(ok)})

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=options.max_request_body_bytes)
    if options.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=options.api_key)
    # Outermost (added last): preflights are answered before auth, and errors carry the CORS headers too.
    app.add_middleware(CORSMiddleware, allow_origins=options.allowed_origins, allow_methods=options.allowed_methods,
                       allow_headers=options.allowed_headers, allow_credentials=options.allow_credentials)
    return app


def bind_socket(host: str | None, port: int) -> socket.socket:
    """Bind the port before the (slow) engine start, so a port in use fails at once."""
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, minus re-raising SIGINT/SIGTERM after a graceful shutdown.

    By then the lifespan has stopped the engine; re-raising would only kill the process mid-cleanup (SIGTERM)
    or print a KeyboardInterrupt traceback (Ctrl-C).
    """

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def run_server(engine_config: EngineConfig, options: ServerOptions) -> None:
    """Load the tokenizer, bind the port, then serve until SIGTERM / Ctrl-C (the engine starts in the lifespan)."""
    import msgspec
    import uvloop

    from core.model_source import resolve_model
    from core.tokenizer import load_tokenizer
    from frontend.generation_config import default_sampling_overrides

    source = resolve_model(engine_config.model, engine_config.revision)
    tokenizer = None
    if not engine_config.skip_tokenizer_init:
        tokenizer = load_tokenizer(source, engine_config.tokenizer, engine_config.chat_template)
    if not engine_config.served_model_names:
        engine_config = msgspec.structs.replace(engine_config, served_model_name=[source.name])
    default_sampling = default_sampling_overrides(engine_config.generation_config, source)
    if default_sampling:
        logger.info("Default sampling parameters from the generation config: %s", default_sampling)
    sock = bind_socket(options.host, options.port)
    app = build_app(engine_config, tokenizer, options, default_sampling)
    server = _Server(uvicorn_config(app, options))
    uvloop.run(server.serve(sockets=[sock]))


def uvicorn_config(app: FastAPI, options: ServerOptions) -> uvicorn.Config:
    """uvicorn's settings from the server options: logging, TLS, the proxy's root path, shutdown timing."""
    return uvicorn.Config(
        app, log_level=options.uvicorn_log_level, access_log=not options.disable_uvicorn_access_log,
        timeout_graceful_shutdown=options.graceful_shutdown_s, timeout_keep_alive=5,
        ssl_keyfile=options.ssl_keyfile, ssl_certfile=options.ssl_certfile, root_path=options.root_path or "",
    )
