"""``ServerOptions``: the HTTP server's settings (not the engine's), one table like ``EngineConfig``.

Each field with an ``Arg`` is a ``pagedserve serve`` flag with vLLM's spelling (``frontend/config_args.py``
generates them); fields without one are set by code (tests, the lifecycle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from frontend.tool_parsers import TOOL_PARSERS
from ipc.config import Arg

UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass
class ServerOptions:
    host: Annotated[str | None, Arg("Address to listen on (default: all interfaces).")] = None
    port: Annotated[int, Arg("Port to listen on.")] = 8000
    api_key: Annotated[str | None, Arg(
        "Require 'Authorization: Bearer <key>' on every API route (default: $PAGEDSERVE_API_KEY, else "
        "$VLLM_API_KEY).")] = None
    max_request_body_mb: Annotated[float, Arg("Largest request body accepted (larger ones get HTTP 413).")] = 32.0
    uvicorn_log_level: Annotated[str, Arg("uvicorn's log level.", choices=UVICORN_LOG_LEVELS)] = "info"
    disable_uvicorn_access_log: Annotated[bool, Arg("Log no line per HTTP request.")] = False
    allowed_origins: Annotated[list[str], Arg("CORS: origins allowed to call the API from a browser.",
                                              nargs="+")] = field(default_factory=lambda: ["*"])
    allowed_methods: Annotated[list[str], Arg("CORS: allowed methods.", nargs="+")] = field(
        default_factory=lambda: ["*"])
    allowed_headers: Annotated[list[str], Arg("CORS: allowed headers.", nargs="+")] = field(
        default_factory=lambda: ["*"])
    allow_credentials: Annotated[bool, Arg("CORS: allow credentials (cookies, auth headers).")] = False
    ssl_keyfile: Annotated[str | None, Arg("TLS private key file (serve HTTPS).")] = None
    ssl_certfile: Annotated[str | None, Arg("TLS certificate file (serve HTTPS).")] = None
    root_path: Annotated[str | None, Arg(
        "The path prefix a reverse proxy serves the app under (FastAPI/ASGI root_path).")] = None
    enable_log_requests: Annotated[bool, Arg(
        "Log each request's id, prompt length, sampling params and (truncated) prompt at INFO.",
        negative_aliases=("--disable-log-requests",))] = False
    max_log_len: Annotated[int | None, Arg(
        "With --enable-log-requests: most prompt characters and token ids logged (default: all).")] = None
    enable_auto_tool_choice: Annotated[bool, Arg(
        "Allow tool_choice 'auto': the model sees the tools and its text is parsed for tool calls by "
        "--tool-call-parser.")] = False
    tool_call_parser: Annotated[str | None, Arg(
        "How the model writes tool calls (needed by --enable-auto-tool-choice).", choices=tuple(TOOL_PARSERS))] = None
    graceful_shutdown_s: float = 5.0
    engine_startup_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser.")

    @property
    def max_request_body_bytes(self) -> int:
        return int(self.max_request_body_mb * 1024 * 1024)
