"""Thirty JSON schemas for the structured-output tests: nested objects, arrays, enums, bounded numbers, required
fields. Kept small so that SmolLM2-135M finishes each within the tests' token budget."""

from __future__ import annotations


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


_STR = {"type": "string", "maxLength": 12}
_INT = {"type": "integer", "minimum": 0, "maximum": 99}

SCHEMAS: list[dict] = [
    _obj({"name": _STR}),
    _obj({"age": _INT}),
    _obj({"name": _STR, "age": _INT}),
    _obj({"ok": {"type": "boolean"}}),
    _obj({"color": {"type": "string", "enum": ["red", "green", "blue"]}}),
    _obj({"score": {"type": "number", "minimum": 0, "maximum": 1}}),
    _obj({"tags": {"type": "array", "items": _STR, "minItems": 1, "maxItems": 3}}),
    _obj({"point": _obj({"x": _INT, "y": _INT})}),
    _obj({"city": _STR, "country": _STR}),
    _obj({"level": {"type": "integer", "enum": [1, 2, 3]}}),
    _obj({"user": _obj({"name": _STR, "admin": {"type": "boolean"}})}),
    _obj({"values": {"type": "array", "items": _INT, "minItems": 2, "maxItems": 4}}),
    _obj({"title": _STR, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}}),
    _obj({"status": {"type": "string", "enum": ["open", "closed"]}, "count": _INT}),
    _obj({"temperature": {"type": "number", "minimum": -50, "maximum": 50}}),
    _obj({"a": _obj({"b": _obj({"c": _INT})})}),
    _obj({"items": {"type": "array", "maxItems": 2, "items": _obj({"id": _INT, "label": _STR})}}),
    _obj({"answer": {"type": "string", "enum": ["yes", "no", "maybe"]}}),
    _obj({"first": _STR, "last": _STR, "age": _INT}),
    _obj({"price": {"type": "number", "minimum": 0, "maximum": 1000}, "currency": {"enum": ["USD", "EUR"]}}),
    _obj({"name": _STR, "nickname": _STR}, required=["name"]),
    _obj({"flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3}}),
    _obj({"size": {"enum": ["S", "M", "L"]}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}),
    _obj({"location": _obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
                            "lon": {"type": "number", "minimum": -180, "maximum": 180}})}),
    _obj({"pets": {"type": "array", "maxItems": 2, "items": {"enum": ["cat", "dog", "fish"]}}}),
    _obj({"id": {"type": "integer", "minimum": 1, "maximum": 50}, "active": {"type": "boolean"}}),
    _obj({"day": {"enum": ["mon", "tue", "wed"]}, "hour": {"type": "integer", "minimum": 0, "maximum": 23}}),
    _obj({"book": _obj({"title": _STR, "pages": {"type": "integer", "minimum": 1, "maximum": 999}})}),
    _obj({"word": {"type": "string", "minLength": 1, "maxLength": 8}}),
    _obj({"rgb": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255},
                  "minItems": 3, "maxItems": 3}}),
]
assert len(SCHEMAS) == 30
