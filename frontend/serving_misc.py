"""The small endpoints vLLM's clients use: ``/tokenizer_info``, ``/invocations`` (SageMaker), ``/load``, and
the response headers some deployments ask for (``X-Request-Id``, ORCA load reports)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from frontend.protocol import OpenAIError

# Routes that do model work: they count toward --enable-server-load-tracking's load, and ORCA reports go on them.
LOAD_TRACKED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/invocations", "/tokenize",
                                "/detokenize"})
ORCA_FORMAT_HEADER = b"endpoint-load-metrics-format"
ORCA_REPORT_HEADER = "endpoint-load-metrics"


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """vLLM's ``/tokenizer_info``: the tokenizer's class and its init settings (special tokens, lengths, chat
    template), made JSON-safe."""
    info = {key: _json_safe(value) for key, value in dict(getattr(tokenizer, "init_kwargs", {})).items()}
    info["tokenizer_class"] = type(tokenizer).__name__
    template = getattr(tokenizer, "chat_template", None)
    if template is not None:
        info["chat_template"] = template
    info.pop("name_or_path", None)  # a local path: nothing a client can use
    return info


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    content = getattr(value, "content", None)  # tokenizers.AddedToken
    if isinstance(content, str):
        return content
    return str(value)


def invocation_route(body: bytes) -> str:
    """SageMaker's ``POST /invocations``: the API path its body belongs to (chat by ``messages``,
    completions by ``prompt``)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise OpenAIError("Invalid request: the body is not valid JSON.") from None
    if isinstance(payload, dict):
        if "messages" in payload:
            return "/v1/chat/completions"
        if "prompt" in payload:
            return "/v1/completions"
    raise OpenAIError("Cannot tell the request type of /invocations: the body needs 'messages' (chat) or "
                      "'prompt' (completions).", param="body")


class ServerLoad:
    """In-flight model requests (``--enable-server-load-tracking``), a stream counting until its last byte."""

    def __init__(self) -> None:
        self.in_flight = 0


def orca_report(fmt: str, named_metrics: dict[str, float]) -> str | None:
    """An ORCA load report for the ``endpoint-load-metrics`` header, in the format asked ("text" or "json")."""
    fmt = fmt.strip().lower()
    if fmt == "json":
        return "JSON " + json.dumps({"named_metrics": named_metrics}, separators=(",", ":"))
    if fmt == "text":
        return "TEXT " + ", ".join(f"named_metrics.{k}={v}" for k, v in named_metrics.items())
    return None


class ResponseHeadersMiddleware:
    """``X-Request-Id`` echo (``--enable-request-id-headers``), in-flight load counting
    (``--enable-server-load-tracking``) and ORCA load reports (when the request sends
    ``endpoint-load-metrics-format``)."""

    def __init__(self, app: ASGIApp, request_id_headers: bool, load: ServerLoad | None,
                 named_metrics: Any) -> None:
        self.app = app
        self.request_id_headers = request_id_headers
        self.load = load
        self.named_metrics = named_metrics  # () -> {name: value}, read when a report is asked for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        root = scope.get("root_path", "")
        path = scope["path"][len(root):] if root and scope["path"].startswith(root) else scope["path"]
        tracked = path in LOAD_TRACKED_PATHS
        request_id = None
        if self.request_id_headers:
            request_id = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        orca_format = headers.get(ORCA_FORMAT_HEADER) if tracked else None

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                if request_id is not None:
                    out["X-Request-Id"] = request_id
                if orca_format is not None:
                    report = orca_report(orca_format.decode("latin-1"), self.named_metrics())
                    if report is not None:
                        out[ORCA_REPORT_HEADER] = report
            await send(message)

        counted = self.load is not None and tracked
        if counted:
            self.load.in_flight += 1
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            if counted:
                self.load.in_flight -= 1
