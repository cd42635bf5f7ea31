"""The JSON value budget counts values outside strings, on the raw bytes, and refuses a body over it with a 413."""

from __future__ import annotations

import json

import pytest

from frontend.json_budget import check_json_values, count_json_values, values_upper_bound
from frontend.protocol import OpenAIError


@pytest.mark.parametrize("value, expected", [
    ({"prompt": [1, 2, 3], "max_tokens": 4}, 1 + 2 + 3),
    ({"messages": [{"role": "user", "content": "a, b, [c], {d}"}]}, 1 + 1 + 1 + 2),
    ({"prompt": 'quote \\" and , "', "stop": ["a", "b,c"]}, 1 + 2 + 2),
    ([], 2),
    ([[], [1, [2, 3]]], 1 + 3 + 2 + 2),
])
def test_counts_values_outside_strings(value, expected):
    """The top-level value, each container's members, plus one per empty container (an upper bound by one)."""
    body = json.dumps(value).encode()
    assert count_json_values(body, 10**9) == expected
    assert values_upper_bound(body) >= expected


def test_a_body_over_the_budget_is_413_and_text_commas_do_not_count():
    check_json_values(json.dumps({"prompt": "a," * 50_000}).encode(), 1000)  # commas in text: 1 value
    check_json_values(json.dumps({"prompt": list(range(500))}).encode(), 1000)
    with pytest.raises(OpenAIError, match="max-request-json-values") as err:
        check_json_values(json.dumps({"prompt": list(range(5000))}).encode(), 1000)
    assert err.value.status_code == 413
    with pytest.raises(OpenAIError):
        check_json_values(json.dumps({"messages": [{"role": "user", "content": "x,"}] * 400}).encode(), 1000)
    check_json_values(json.dumps({"prompt": list(range(5000))}).encode(), 0)  # 0: no limit


def test_big_bodies_count_the_same_through_numpy():
    body = json.dumps({"prompt": list(range(40_000)), "stop": ["[x, {y"] * 30_000}).encode()  # > 64 KB
    expected = body.count(b",") + body.count(b"[") + body.count(b"{") + 1
    assert values_upper_bound(body) == expected
    assert values_upper_bound(body, 10, len(body) - 10) == \
        body.count(b",", 10, len(body) - 10) + body.count(b"[", 10, len(body) - 10) + \
        body.count(b"{", 10, len(body) - 10) + 1
    assert count_json_values(body, 10**9) == 1 + 2 + 40_000 + 30_000
