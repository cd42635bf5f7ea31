"""Structured-output request fields -> ``StructuredOutputsParams``, checked before the request reaches the core.

Sources (at most one per request): OpenAI's ``response_format`` (``json_object``, ``json_schema``), vLLM's
``structured_outputs`` object and its older ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` fields. The constraint is parsed with xgrammar here (milliseconds, no vocabulary needed), so a
bad schema, regex or grammar is a 400 carrying the compiler's message instead of a failure inside the engine.
"""

from __future__ import annotations

import json
from typing import Any

from frontend.protocol import OpenAIError
from ipc.messages import SamplingParamError, StructuredOutputsParams

# vLLM's ``structured_outputs`` fields that change nothing here: the engine has no fallback backend, and JSON is
# always compact (``disable_any_whitespace``), so these values are what it does anyway.
_ACCEPTED_AS_IS = {"disable_fallback": (True, False), "disable_any_whitespace": (True,),
                   "backend": ("auto", "xgrammar"), "disable_additional_properties": (False,)}
_KINDS = ("json", "regex", "choice", "grammar", "json_object")
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def structured_outputs_from_request(request: Any) -> StructuredOutputsParams | None:
    """The request's constraint (None when it has none); ``OpenAIError`` 400 when it is malformed or ambiguous."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    response_format = getattr(request, "response_format", None)
    if response_format:
        params = _from_response_format(response_format)
        if params is not None:
            found.append(("response_format", params))
    if getattr(request, "structured_outputs", None) is not None:
        found.append(("structured_outputs", _from_structured_outputs(request.structured_outputs)))
    for name in GUIDED_FIELDS:
        value = getattr(request, name, None)
        if value is not None:
            found.append((name, _build(name, **{name.removeprefix("guided_"): _schema_text(value, name)})))
    backend = getattr(request, "guided_decoding_backend", None)
    if backend not in (None, "auto", "xgrammar"):
        raise OpenAIError(f"guided_decoding_backend {backend!r} is not supported (only 'xgrammar').",
                          param="guided_decoding_backend")
    if len(found) > 1:
        raise OpenAIError(f"Only one structured-output constraint per request; got {[n for n, _ in found]}.",
                          param=found[1][0])
    if not found:
        return None
    name, params = found[0]
    validate_structured_outputs(params, name)
    return params


def _from_response_format(fmt: dict[str, Any]) -> StructuredOutputsParams | None:
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise OpenAIError("response_format.json_schema must be an object with a 'schema'.",
                              param="response_format")
        schema = spec.get("schema")
        if schema is None:
            return StructuredOutputsParams(json_object=True)  # a named format without a schema: any JSON object
        return _build("response_format", json=_schema_text(schema, "response_format"))
    raise OpenAIError(f"response_format type {kind!r} is not supported (text, json_object, json_schema).",
                      param="response_format")


def _from_structured_outputs(value: Any) -> StructuredOutputsParams:
    if not isinstance(value, dict):
        raise OpenAIError("structured_outputs must be an object.", param="structured_outputs")
    fields: dict[str, Any] = {}
    for key, item in value.items():
        if item is None:
            continue
        if key in _KINDS:
            fields[key] = _schema_text(item, "structured_outputs") if key == "json" else item
        elif key in _ACCEPTED_AS_IS:
            if item not in _ACCEPTED_AS_IS[key]:
                raise OpenAIError(f"structured_outputs.{key}={item!r} is not supported.", param="structured_outputs")
        else:
            raise OpenAIError(f"structured_outputs.{key} is not supported.", param="structured_outputs")
    if fields.get("json_object") is False:
        del fields["json_object"]
    return _build("structured_outputs", **fields)


def _schema_text(value: Any, param: str) -> Any:
    """A JSON schema given as a dict or as JSON text -> its text; other kinds pass through."""
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, str) and param in ("guided_json", "response_format", "structured_outputs"):
        try:
            json.loads(value)
        except ValueError as exc:
            raise OpenAIError(f"The JSON schema is not valid JSON: {exc}", param=param) from None
    return value


def _build(param: str, **fields: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except SamplingParamError as exc:
        raise OpenAIError(str(exc), param=param) from None
    except (TypeError, ValueError) as exc:
        raise OpenAIError(f"Invalid {param}: {exc}", param=param) from None


def validate_structured_outputs(params: StructuredOutputsParams, param: str = "structured_outputs") -> None:
    """Parse the constraint with xgrammar (no vocabulary needed): 400 with the compiler's message if it fails."""
    import xgrammar as xgr

    from core.structured_output.compiler import choice_grammar, xgrammar_message

    kind, text = params.key
    try:
        if kind == "json":
            schema = json.loads(text)
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be an object")
            xgr.Grammar.from_json_schema(text, any_whitespace=False)
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind == "choice":
            xgr.Grammar.from_ebnf(choice_grammar(params.choice))
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(text)
    except Exception as exc:
        raise OpenAIError(f"Invalid {kind} for structured output: {xgrammar_message(exc)}", param=param) from None


def check_structured_outputs(params: StructuredOutputsParams) -> None:
    """``validate_structured_outputs`` for the offline ``LLM``: a ``ValueError`` instead of an HTTP error."""
    try:
        validate_structured_outputs(params)
    except OpenAIError as exc:
        raise ValueError(exc.message) from None
