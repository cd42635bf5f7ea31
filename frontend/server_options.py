"""``ServerOptions``: the HTTP server's settings (not the engine's), one table like ``EngineConfig``.

Each field with an ``Arg`` is a ``pagedserve serve`` flag with vLLM's spelling (``frontend/config_args.py``
generates them); fields without one are set by code (tests, the lifecycle).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated

from frontend.json_budget import DEFAULT_MAX_JSON_VALUES
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
    max_request_json_values: Annotated[int, Arg(
        "Most JSON values (array elements and object members) a request body may hold; more get HTTP 413 before "
        "parsing, which holds the event loop for about a second per few million values (0: no limit).")] = \
        DEFAULT_MAX_JSON_VALUES
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
    uds: Annotated[str | None, Arg("Serve on this Unix domain socket path instead of host:port.")] = None
    enable_force_include_usage: Annotated[bool, Arg(
        "End every stream with a usage chunk, whether or not stream_options.include_usage asks for it.")] = False
    enable_prompt_tokens_details: Annotated[bool, Arg(
        "Add usage.prompt_tokens_details.cached_tokens (prompt tokens served from the prefix cache).")] = False
    enable_per_request_metrics: Annotated[bool, Arg(
        "Add the request's timing (time to first token, latency) as 'metrics' on its response, or on the "
        "stream's usage chunk.")] = False
    enable_request_id_headers: Annotated[bool, Arg(
        "Echo the request's X-Request-Id header on its response (a fresh id when it has none).")] = False
    enable_server_load_tracking: Annotated[bool, Arg(
        "Count in-flight API requests; GET /load reports the count as server_load.")] = False
    enable_tokenizer_info_endpoint: Annotated[bool, Arg(
        "Serve GET /tokenizer_info (the tokenizer's settings, chat template included).")] = False
    max_n: Annotated[int, Arg(
        "Largest n (choices per prompt) a request may ask for; larger ones get HTTP 400 (OpenAI's limit: 128).")] = 128
    trust_request_chat_template: Annotated[bool, Arg(
        "Accept a chat_template in requests (it is code, run in a sandbox with size and time limits); without "
        "this flag such requests get HTTP 400.")] = False
    shutdown_timeout: Annotated[float, Arg(
        "On SIGTERM: stop taking requests (503) and give in-flight ones this many seconds to finish; then end "
        "them with an error (streams: an error event and [DONE]; others: HTTP 503).")] = 30.0
    timeout_keep_alive: Annotated[float, Arg(
        "Close a keep-alive connection idle for this many seconds (uvicorn's setting).")] = 5.0
    timeout_request_headers: Annotated[float, Arg(
        "Close a connection whose request line and headers have not all arrived this many seconds after it "
        "opened or went idle (slow-loris clients).")] = 10.0
    enable_auto_tool_choice: Annotated[bool, Arg(
        "Allow tool_choice 'auto': the model sees the tools and its text is parsed for tool calls by "
        "--tool-call-parser.")] = False
    tool_call_parser: Annotated[str | None, Arg(
        "How the model writes tool calls (needed by --enable-auto-tool-choice).", choices=tuple(TOOL_PARSERS))] = None
    api_server_count: Annotated[int | None, Arg(
        "API server processes sharing the port, each with its own tokenizer, detokenizer and engine connection "
        "(vLLM's flag). Default: 1 below 8 CPU cores, else one per 8 cores, at most 4.")] = None
    graceful_shutdown_s: float = 5.0
    engine_startup_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser.")
        if self.api_server_count is not None and self.api_server_count < 1:
            raise ValueError(f"--api-server-count must be at least 1, got {self.api_server_count}.")

    @property
    def num_api_servers(self) -> int:
        """--api-server-count, or its default from the machine's cores."""
        if self.api_server_count is not None:
            return self.api_server_count
        cores = os.cpu_count() or 1
        return 1 if cores < 8 else min(4, cores // 8)

    @property
    def max_request_body_bytes(self) -> int:
        return int(self.max_request_body_mb * 1024 * 1024)
