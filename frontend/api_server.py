"""The OpenAI-compatible HTTP server: FastAPI routes, auth, error shapes, and the process's lifecycle.

The engine core starts in the app's lifespan, before uvicorn accepts a connection, and stops in it, so
SIGTERM / Ctrl-C (handled by uvicorn) stop both processes. Every error leaves as OpenAI's
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import sys
import threading
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.gc_tuning import freeze_startup_heap
from frontend.engine_client import EngineAttachment, EngineClient
from frontend.json_budget import check_json_values
from frontend.lifecycle import Lifecycle, LifecycleMiddleware, header_timeout_protocol, release_memory_soon
from frontend.loop_monitor import LoopMonitor
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
from frontend.openapi import install_openapi
from frontend.request_logger import RequestLogger
from frontend.server_options import ServerOptions
from frontend.serving_chat import ChatServing
from frontend.serving_common import ServingContext, json_response
from frontend.serving_completion import CompletionServing
from frontend.serving_embedding import EmbeddingRequest, EmbeddingServing
from frontend.serving_misc import ResponseHeadersMiddleware, ServerLoad, invocation_route, tokenizer_info
from frontend.serving_tokenize import TokenizeServing
from frontend.usage import UsageOptions
from ipc.config import EngineConfig

logger = logging.getLogger("pagedserve.server")

PUBLIC_PATHS = frozenset({"/health", "/ping", "/version", "/metrics", "/load"})


def version() -> str:
    try:
        return metadata.version("pagedserve")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code)


# ------------------------------------------------------------------------------------------ middleware


class ApiKeyMiddleware:
    """vLLM's rule: the OpenAI API under ``/v1`` answers 401 unless ``Authorization: Bearer <key>`` (the scheme in
    any case); the other routes (health, metrics, tokenize, ...) and CORS preflights stay open. The path is the
    ASGI path less ``--root-path``, never rebuilt from the Host header."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token, self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and _route_path(scope).startswith("/v1"):
            if not self._authorized(scope):
                error = OpenAIError("Unauthorized: a valid API key is required (Authorization: Bearer <key>).",
                                    status_code=401)
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path without the proxy's ``--root-path`` prefix (uvicorn puts it in front of ``path``)."""
    root, path = scope.get("root_path", ""), scope["path"]
    return path[len(root):] if root and path.startswith(root) else path


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


BodyModel = type[BaseModel] | TypeAdapter


def _parse_body(model: BodyModel, body: bytes) -> Any:
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_json(body)
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


_BIG_BODY_BYTES = 256 * 1024


async def _parse_body_off_loop(model: BodyModel, body: bytes, request: Request) -> Any:
    """Parse a big body in a worker thread: a multi-megabyte JSON array takes the event loop for a while; one
    with more values than --max-request-json-values is refused before it is parsed (frontend/json_budget.py)."""
    if len(body) < _BIG_BODY_BYTES:
        return _parse_body(model, body)
    max_values = request.app.state.max_json_values
    try:
        return await asyncio.get_running_loop().run_in_executor(None, _parse_big_body, model, body, max_values)
    finally:
        release_memory_soon()


def _parse_big_body(model: BodyModel, body: bytes, max_values: int) -> Any:
    """msgspec's JSON decoder then pydantic on the objects: about half the time pydantic's own JSON path takes
    on a multi-megabyte string, and both hold the GIL (the event loop waits) while they run."""
    check_json_values(body, max_values)
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return _parse_body(model, body)  # pydantic's message for the malformed JSON
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_python(data)
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


_TOKENIZE_BODY = TypeAdapter(TokenizeChatRequest | TokenizeCompletionRequest)


def _body_schema(model: BodyModel) -> dict:
    """The request body's schema in the OpenAPI document (the route reads the body itself)."""
    schema = model.json_schema() if isinstance(model, TypeAdapter) else model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _check_task(request: Request, task: str) -> None:
    """A generation request to an embedding model, or an embeddings request to a generation model: a 400."""
    is_embedding = request.app.state.embedding_info is not None
    if task == "embed" and not is_embedding:
        raise OpenAIError("This model is a generation model: /v1/embeddings needs an embedding model (or a decoder "
                          "served with --task embed).", param="model")
    if task == "generate" and is_embedding:
        raise OpenAIError("This model is an embedding model: it serves /v1/embeddings, not text generation.",
                          param="model")


def build_app(engine_config: EngineConfig, tokenizer: Any | None, options: ServerOptions,
              default_sampling: dict[str, Any] | None = None, attachment: EngineAttachment | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine core (or, with ``attachment``, connects to the one the
    ``--api-server-count`` launcher started) and waits for READY.

    ``default_sampling``: sampling defaults from ``--generation-config`` (``frontend/generation_config.py``).
    """
    served_names = engine_config.served_model_names or [engine_config.model or ""]
    request_logger = RequestLogger(options.max_log_len) if options.enable_log_requests else None

    lifecycle = Lifecycle(options.shutdown_timeout)

    async def start_engine(app: FastAPI) -> None:
        """Start the core and wait for READY in the background: the port answers (503) while the model loads,
        and SIGTERM stops the load at once."""
        client: EngineClient = app.state.client
        try:
            ready = await client.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.error("%s", exc)
            lifecycle.request_exit(1)
            return
        if not served_names[0]:
            served_names[0] = ready.model
        ctx = ServingContext(client, tokenizer, served_names, ready.model, ready.max_model_len,
                             ready.vocab_size, max_logprobs=engine_config.max_logprobs,
                             default_sampling=default_sampling or {}, request_logger=request_logger,
                             max_n=options.max_n, trust_request_chat_template=options.trust_request_chat_template,
                             usage=UsageOptions(options.enable_force_include_usage,
                                                options.enable_prompt_tokens_details,
                                                options.enable_per_request_metrics),
                             enable_auto_tool_choice=options.enable_auto_tool_choice,
                             tool_call_parser=options.tool_call_parser)
        app.state.ctx = ctx
        app.state.completion = CompletionServing(ctx)
        app.state.chat = ChatServing(ctx)
        app.state.tokenize = TokenizeServing(ctx)
        app.state.embedding_info = ready.embedding  # None: a generation model
        app.state.embedding = EmbeddingServing(ctx, ready.embedding) if ready.embedding is not None else None
        client.on_dead = lifecycle.engine_died
        if attachment is not None:  # the launcher stops every API process once the core is gone
            client.on_dead = lambda reason, status: lifecycle.engine_died(reason, status, exit_process=False)
        lifecycle.ready = True
        where = f"unix:{options.uds}" if options.uds else f"http://{options.host or '0.0.0.0'}:{options.port}"
        logger.info("pagedserve %s serving %s (max_model_len %d) on %s", version(),
                    ", ".join(served_names), ready.max_model_len, where)
        # Everything allocated so far lives as long as the server: keep the cyclic GC from rescanning it
        # (its pauses stall every stream at once), and collect less often under per-token churn.
        client.metrics.gc_frozen_objects.set(freeze_startup_heap())
        app.state.loop_monitor = LoopMonitor(client.metrics)
        app.state.loop_monitor.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = EngineClient(engine_config, tokenizer, served_names[0],
                              startup_timeout_s=options.engine_startup_timeout_s, attachment=attachment)
        app.state.client = client
        lifecycle.loop = asyncio.get_running_loop()
        starting = asyncio.create_task(start_engine(app), name="engine-start")
        try:
            yield
        finally:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            if getattr(app.state, "loop_monitor", None) is not None:
                await app.state.loop_monitor.stop()
            await client.shutdown()

    app = FastAPI(title="pagedserve", version=version(), lifespan=lifespan)
    app.state.lifecycle = lifecycle
    app.state.max_json_values = options.max_request_json_values
    install_openapi(app)
    server_load = ServerLoad()

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
        unavailable = lifecycle.unavailable_reason()
        if unavailable is not None:
            return error_response(OpenAIError(unavailable, status_code=503))
        client: EngineClient = request.app.state.client
        if client.is_healthy:
            return Response(status_code=200)
        return error_response(OpenAIError(client.dead_error or "The engine is not running.", status_code=503))

    # SageMaker's health check; one route per method so each has its own operation id.
    app.add_api_route("/ping", health, methods=["GET"], operation_id="ping_get")
    app.add_api_route("/ping", health, methods=["POST"], operation_id="ping_post")

    @app.get("/load")
    async def load() -> JSONResponse:
        """In-flight model requests (counted with --enable-server-load-tracking, else 0)."""
        return JSONResponse({"server_load": server_load.in_flight})

    if options.enable_tokenizer_info_endpoint:  # it shows the chat template: opt-in, as in vLLM
        @app.get("/tokenizer_info")
        async def get_tokenizer_info(request: Request) -> JSONResponse:
            return JSONResponse(tokenizer_info(request.app.state.ctx.require_tokenizer()))

    @app.post("/invocations", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"anyOf": [{"$ref": "#/components/schemas/CompletionRequest"},
                             {"$ref": "#/components/schemas/ChatCompletionRequest"}]}}}}})
    async def invocations(request: Request) -> Response:
        """SageMaker-style: chat when the body has ``messages``, completions when it has ``prompt``."""
        body = await request.body()
        if invocation_route(body) == "/v1/chat/completions":
            return await request.app.state.chat.create(
                await _parse_body_off_loop(ChatCompletionRequest, body, request), request)
        return await request.app.state.completion.create(
            await _parse_body_off_loop(CompletionRequest, body, request), request)

    @app.get("/version")
    async def get_version() -> JSONResponse:
        return JSONResponse({"version": version()})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        ctx: ServingContext = request.app.state.ctx
        task = "generate" if request.app.state.embedding_info is None else "embed"
        cards = [ModelCard(id=name, root=ctx.model_path, max_model_len=ctx.max_model_len, task=task)
                 for name in ctx.served_model_names]
        return json_response(ModelList(data=cards))

    # The two hot endpoints parse their bodies with pydantic directly: FastAPI's dependency machinery costs
    # ~0.6 ms a request, which at hundreds of requests a second delays every stream's tokens.
    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        _check_task(request, "generate")
        body = await _parse_body_off_loop(CompletionRequest, await request.body(), request)
        return await request.app.state.completion.create(body, request)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        _check_task(request, "generate")
        body = await _parse_body_off_loop(ChatCompletionRequest, await request.body(), request)
        return await request.app.state.chat.create(body, request)

    @app.post("/v1/embeddings", openapi_extra=_body_schema(EmbeddingRequest))
    async def embeddings(request: Request) -> Response:
        _check_task(request, "embed")
        body = await _parse_body_off_loop(EmbeddingRequest, await request.body(), request)
        return await request.app.state.embedding.create(body, request)

    @app.post("/tokenize", openapi_extra=_body_schema(_TOKENIZE_BODY))
    async def tokenize(request: Request) -> JSONResponse:
        body = await _parse_body_off_loop(_TOKENIZE_BODY, await request.body(), request)
        return json_response(await request.app.state.tokenize.tokenize(body))

    @app.post("/detokenize", openapi_extra=_body_schema(DetokenizeRequest))
    async def detokenize(request: Request) -> JSONResponse:
        body = await _parse_body_off_loop(DetokenizeRequest, await request.body(), request)
        return json_response(await request.app.state.tokenize.detokenize(body))

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
    app.add_middleware(LifecycleMiddleware, lifecycle=lifecycle, always_open=PUBLIC_PATHS)

    def orca_metrics() -> dict[str, float]:
        stats = app.state.client.metrics.latest_stats if app.state.client.metrics is not None else None
        if stats is None:
            return {"kv_cache_usage_perc": 0.0, "num_requests_running": 0, "num_requests_waiting": 0}
        return {"kv_cache_usage_perc": stats.kv_cache_usage, "num_requests_running": stats.num_running,
                "num_requests_waiting": stats.num_waiting}

    app.add_middleware(ResponseHeadersMiddleware, request_id_headers=options.enable_request_id_headers,
                       load=server_load if options.enable_server_load_tracking else None,
                       named_metrics=orca_metrics)
    if options.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=options.api_key)
    # Outermost (added last): preflights are answered before auth, and errors carry the CORS headers too.
    app.add_middleware(CORSMiddleware, allow_origins=options.allowed_origins, allow_methods=options.allowed_methods,
                       allow_headers=options.allowed_headers, allow_credentials=options.allow_credentials)
    return app


def bind_socket(host: str | None, port: int, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """Bind the port before the (slow) engine start, so a port in use fails at once.

    ``reuse_port``: SO_REUSEPORT, so each ``--api-server-count`` process listens on its own socket and the kernel
    spreads connections evenly (one shared socket let one process take nearly all of them); the launcher binds
    without listening, only to hold the port and fail fast.
    """
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    if not listen:
        return sock
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def bind_unix_socket(path: str) -> socket.socket:
    """``--uds``: listen on a Unix domain socket (a stale socket file from an earlier run is replaced)."""
    import os
    import stat

    if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server with our SIGTERM: the first signal drains (``frontend/lifecycle.py``), a second stops now.

    Signals are not re-raised after the shutdown: by then the lifespan has stopped the engine; re-raising would
    only kill the process mid-cleanup (SIGTERM) or print a KeyboardInterrupt traceback (Ctrl-C).
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, app: FastAPI) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.app = app
        lifecycle.server = self

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

    def handle_exit(self, sig: int, frame: Any) -> None:
        lifecycle = self.lifecycle
        loop = getattr(lifecycle, "loop", None)
        if lifecycle.ready and not lifecycle.draining and not self.should_exit and loop is not None:
            loop.call_soon_threadsafe(lifecycle.begin_drain, getattr(self.app.state, "client", None))
            return
        super().handle_exit(sig, frame)


def run_server(engine_config: EngineConfig, options: ServerOptions) -> None:
    """Bind the port, load the tokenizer, then serve until SIGTERM / Ctrl-C (the engine starts in the lifespan).

    Exits with status 1 when the engine fails to start or dies, so a supervisor restarts the server.
    """
    many = options.num_api_servers > 1
    try:  # first: a port in use fails before anything is loaded
        if options.uds:
            sock = bind_unix_socket(options.uds)
        else:
            sock = bind_socket(options.host, options.port, reuse_port=many, listen=not many)
    except OSError as exc:
        where = options.uds or f"{options.host or '0.0.0.0'}:{options.port}"
        logger.error("Cannot listen on %s: %s", where, exc.strerror or exc)
        sys.exit(1)
    if many:
        from frontend.multi_api import run_multi_server

        sys.exit(run_multi_server(engine_config, options, sock))
    serve_on_socket(engine_config, options, sock)


def serve_on_socket(engine_config: EngineConfig, options: ServerOptions, sock: socket.socket,
                    attachment: EngineAttachment | None = None) -> None:
    """Load the tokenizer and serve on the bound ``sock`` until SIGTERM / Ctrl-C; exits 1 if the engine dies."""
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
    app = build_app(engine_config, tokenizer, options, default_sampling, attachment)
    lifecycle: Lifecycle = app.state.lifecycle
    server = _Server(uvicorn_config(app, options), lifecycle, app)
    uvloop.run(server.serve(sockets=[sock]))
    if lifecycle.exit_code:
        sys.exit(lifecycle.exit_code)


def uvicorn_config(app: FastAPI, options: ServerOptions) -> uvicorn.Config:
    """uvicorn's settings from the server options: logging, TLS, the proxy's root path, connection timeouts."""
    return uvicorn.Config(
        app, log_level=options.uvicorn_log_level, access_log=not options.disable_uvicorn_access_log,
        timeout_graceful_shutdown=options.graceful_shutdown_s, timeout_keep_alive=options.timeout_keep_alive,
        http=header_timeout_protocol(options.timeout_request_headers),
        ssl_keyfile=options.ssl_keyfile, ssl_certfile=options.ssl_certfile, root_path=options.root_path or "",
    )
