"""``json_object``'s grammar (``JSON_OBJECT_GRAMMAR``, written for fast mask fills) has exactly the language of the
JSON schema ``{"type": "object"}`` compiled compact, as before: the same strings accepted and rejected, and the same
token mask at every step of random walks over a vocabulary of JSON fragments that cross every boundary."""

from __future__ import annotations

import json
import random

import pytest

xgr = pytest.importorskip("xgrammar")
torch = pytest.importorskip("torch")

from core.structured_output.compiler import JSON_OBJECT_GRAMMAR  # noqa: E402

# Single characters, and fragments that span a string's end and its separator, a value and the next key, nested
# closers, numbers' signs, fractions and exponents, escapes, keywords cut anywhere, and whitespace (never allowed).
FRAGMENTS = [
    "{", "}", "[", "]", '"', ":", ",", " ", "\n", ": ", ", ", '":', '": ', '",', '", ', '"}', '"]', '"},', '{"',
    '["', "[]", "{}", "}}", "]]", "}]", "],", "},", "}, ", "], ", "a", "b", "key", "x y", "0", "1", "2", "9",
    "10", "-", "-0", "-1", "01", ".", ".5", "0.", "e", "E", "e+", "E-", "1e", "2E+", "+", "true", "tr", "ue",
    "false", "fal", "null", "nu", "ll", "\\", '\\"', "\\n", "\\u", "\\u00", "e9", "ff", "\\/", "\t", "é", "中",
    ' "', '" ', "1,", "2]", "3}", '1, "', '"a": "', '": {', '": [', '": "', ": 1", "1}", "true}", "null,",
]
STOP = "</s>"


def _compiled() -> tuple:
    info = xgr.TokenizerInfo(FRAGMENTS + [STOP], stop_token_ids=[len(FRAGMENTS)])
    compiler = xgr.GrammarCompiler(info)
    return (compiler.compile_json_schema('{"type": "object"}', any_whitespace=False),
            compiler.compile_grammar(JSON_OBJECT_GRAMMAR))


def _random_value(rng: random.Random, depth: int):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([0, 5, -17, 3.25, -1e-5, 123456789, 1.5e10, -0.0])
    if kind == 1:
        return rng.choice(["", "a b", 'q"uote', "back\\slash", "é中", "tab\tnl\n", "}]{[,:", "/"])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.choice([1, "x", None])
    if kind == 4:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}{rng.choice(['', 'é', ' q'])}": _random_value(rng, depth + 1) for i in range(rng.randrange(4))}


def test_the_same_strings_are_objects_in_both():
    old, new = _compiled()
    rng = random.Random(0)
    strings = [json.dumps({f"k{j}": _random_value(rng, 1) for j in range(rng.randrange(4))},
                          ensure_ascii=rng.random() < 0.5) for _ in range(200)]
    strings += ['{"a":1}', '{"a": 1,"b": 2}', "[1]", '{"a": 01}', '{"a": -}', '{"a": [1,2]}', '{ }', '{"a" : 1}',
                '{"a": 1e}', '{"a": .5}', '{"a": "\\x"}', '{"a": tru}', '"{}"', '{"a": [1, 2], }']
    for text in strings:
        accepted = []
        for grammar in (old, new):
            matcher = xgr.GrammarMatcher(grammar, terminate_without_stop_token=True)
            accepted.append(matcher.accept_string(text) and matcher.is_terminated())
        assert accepted[0] == accepted[1], (text, accepted)
    assert sum(xgr.GrammarMatcher(new).accept_string(t) for t in strings) >= 200  # the json.dumps ones


@pytest.mark.parametrize("seed", [1, 2])
def test_every_mask_of_random_walks_is_the_same(seed):
    old, new = _compiled()
    vocab = len(FRAGMENTS) + 1
    rng = random.Random(seed)
    num_rows = 48
    walks = [(xgr.GrammarMatcher(old), xgr.GrammarMatcher(new)) for _ in range(num_rows)]
    masks = xgr.allocate_token_bitmask(2, vocab)
    compared = 0
    for _ in range(60):
        for old_matcher, new_matcher in walks:
            if old_matcher.is_terminated():
                assert new_matcher.is_terminated()
                continue
            old_matcher.fill_next_token_bitmask(masks, 0)
            new_matcher.fill_next_token_bitmask(masks, 1)
            assert torch.equal(masks[0], masks[1])
            compared += 1
            allowed = [t for t in range(vocab) if (int(masks[1, t // 32]) >> (t % 32)) & 1]
            # Mostly keep going (the stop token ends a walk once its object is complete).
            choices = [t for t in allowed if t != vocab - 1] or allowed
            token = rng.choice(choices if rng.random() < 0.97 else allowed)
            assert old_matcher.accept_token(token) and new_matcher.accept_token(token)
    assert compared > 1000
