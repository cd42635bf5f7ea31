"""CPU smoke test of the API stage-cost benchmark (benchmarks/api_stage_costs.py) at a tiny size."""

from __future__ import annotations

from benchmarks.api_stage_costs import _load_tokenizer, format_table, measure


def test_stage_costs_run_and_report_every_stage():
    results = measure(_load_tokenizer("tests/data/smollm2-135m"), streams=8, input_len=64, steps=4)
    for key in ("request/parse (pydantic)", "request/tokenize", "token/detokenize (per sequence)",
                "token/SSE framing (pre-encoded)", "token/JSON chunk (pre-encoded frame)"):
        assert results[key] > 0, key
    assert "| token/SSE framing (sse-starlette) |" in format_table(results)
