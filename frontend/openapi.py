"""``/openapi.json`` that describes what the server really answers, for schema-driven clients and fuzzers.

FastAPI's generated document is patched here: request-body schemas' ``$defs`` move to ``components`` (their
``#/$defs/...`` references were dangling), the msgspec response bodies get their schemas, endpoints without a
JSON body say so (health: empty, metrics: Prometheus text), FastAPI's unused 422 responses are replaced by the
OpenAI error body every route can answer with.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from frontend.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    ChatCompletionStreamResponse,
    CompletionResponse,
    CompletionStreamResponse,
)

COMPONENTS = "#/components/schemas/"
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        # The HTTP status, or OpenAI's string code where it has one (model_not_found).
        "code": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}}},
}
_ERROR_RESPONSE = {"description": "An OpenAI-style error.",
                   "content": {"application/json": {"schema": {"$ref": COMPONENTS + "ErrorResponse"}}}}
_SSE = {"text/event-stream": {"schema": {"type": "string"}}}

# path -> method -> the 200 response.
_SUCCESS: dict[str, dict[str, dict[str, Any]]] = {
    "/v1/completions": {"post": {"description": "The completion, or its SSE stream (stream: true).",
                                 "content": {"application/json": {"schema": {"$ref": COMPONENTS +
                                                                             "CompletionResponse"}}, **_SSE}}},
    "/v1/chat/completions": {"post": {"description": "The chat completion, or its SSE stream (stream: true).",
                                      "content": {"application/json": {"schema": {"$ref": COMPONENTS +
                                                                                  "ChatCompletionResponse"}},
                                                  **_SSE}}},
    "/health": {"get": {"description": "The engine is running (empty body)."}},
    "/ping": {"get": {"description": "The engine is running (empty body)."},
              "post": {"description": "The engine is running (empty body)."}},
    "/metrics": {"get": {"description": "Prometheus metrics.",
                         "content": {"text/plain": {"schema": {"type": "string"}}}}},
}


def _move_defs(node: Any, components: dict[str, Any]) -> Any:
    """Hoist nested ``$defs`` into ``components`` and point their references there."""
    if isinstance(node, dict):
        for name, schema in node.pop("$defs", {}).items():
            components.setdefault(name, _move_defs(schema, components))
        for key, value in list(node.items()):
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                node[key] = COMPONENTS + value[len("#/$defs/"):]
            else:
                node[key] = _move_defs(value, components)
    elif isinstance(node, list):
        return [_move_defs(item, components) for item in node]
    return node


def build_openapi(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    _move_defs(doc["paths"], components)
    _, response_schemas = msgspec.json.schema_components(
        [CompletionResponse, ChatCompletionResponse, CompletionStreamResponse, ChatCompletionStreamResponse],
        ref_template=COMPONENTS + "{name}")
    components.update(response_schemas)
    for model in (CompletionRequest, ChatCompletionRequest):  # /invocations refers to them
        components[model.__name__] = _move_defs(model.model_json_schema(), components)
    components["ErrorResponse"] = ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path in _SUCCESS and method in _SUCCESS[path]:
                responses["200"] = _SUCCESS[path][method]
            responses["default"] = _ERROR_RESPONSE  # 400/401/404/413/500/503: the OpenAI error body
    return doc


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
