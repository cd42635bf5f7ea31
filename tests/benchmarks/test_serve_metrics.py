"""Metric definitions on hand-made request timings (no server): the numbers vllm bench serve would print."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.openai_client import RequestOutput
from benchmarks.serve_metrics import compute_metrics, format_table, peak_concurrency, token_rate_series


def _done(start, ttft, gaps, output_tokens=None, prompt_len=10, expected=None, server_prompt=None):
    out = RequestOutput(prompt_len=prompt_len, expected_output_len=expected or len(gaps) + 1)
    out.started = out.success = True
    out.start_time, out.ttft, out.itl = start, ttft, list(gaps)
    out.chunk_times = list(start + ttft + np.concatenate([[0.0], np.cumsum(gaps)]))
    out.latency = ttft + sum(gaps)
    out.end_time = start + out.latency
    out.output_tokens = output_tokens if output_tokens is not None else len(gaps) + 1
    out.server_prompt_tokens = server_prompt
    out.generated_text = "x" * out.output_tokens
    return out


def _failed(error, start=0.0):
    out = RequestOutput(prompt_len=10, expected_output_len=4)
    out.started, out.error, out.start_time, out.end_time = True, error, start, start + 0.1
    return out


def _metrics(outputs, duration=2.0, ignore_eos=True):
    return compute_metrics(outputs, duration, count_text=len, percentiles=[50, 90, 99], ignore_eos=ignore_eos)


def test_latency_definitions_match_vllm():
    a = _done(0.0, 0.1, [0.02, 0.04, 0.06])        # 4 tokens, E2E 0.22
    b = _done(0.5, 0.3, [0.01] * 9)                # 10 tokens, E2E 0.39
    m = _metrics([a, b])
    assert m.completed == 2 and m.failed == 0
    assert m.latencies_ms["ttft"]["mean"] == pytest.approx(200.0)
    assert m.latencies_ms["ttft"]["median"] == pytest.approx(200.0)
    assert m.latencies_ms["e2el"]["mean"] == pytest.approx((220 + 390) / 2)
    tpots = [(0.22 - 0.1) / 3 * 1000, (0.39 - 0.3) / 9 * 1000]  # (E2E - TTFT) / (tokens - 1), per request
    assert m.latencies_ms["tpot"]["mean"] == pytest.approx(np.mean(tpots))
    itls = np.array([0.02, 0.04, 0.06] + [0.01] * 9) * 1000   # pooled over requests
    assert m.latencies_ms["itl"]["mean"] == pytest.approx(itls.mean())
    assert m.latencies_ms["itl"]["p90"] == pytest.approx(np.percentile(itls, 90))
    assert m.latencies_ms["itl"]["std"] == pytest.approx(itls.std())
    assert m.total_output_tokens == 14 and m.output_tokens_source == "usage"
    assert m.output_throughput == pytest.approx(7.0) and m.request_throughput == pytest.approx(1.0)
    assert m.total_token_throughput == pytest.approx((20 + 14) / 2.0)


def test_failures_are_counted_and_grouped_by_reason():
    outputs = [_done(0.0, 0.1, [0.01] * 3), _failed("HTTP 500: boom"), _failed("HTTP 500: boom"),
               _failed("ClientConnectorError: refused\ntraceback line")]
    m = _metrics(outputs)
    assert m.completed == 1 and m.failed == 3
    assert m.failure_reasons == {"HTTP 500: boom": 2, "ClientConnectorError: refused": 1}
    assert m.total_output_tokens == 4
    table = format_table(m, {"max_concurrency": 4, "request_rate": float("inf")}, ["ttft", "e2el"])
    assert "Failed requests:                         3" in table
    assert "     2 x HTTP 500: boom" in table and "Maximum request concurrency:             4" in table


def test_no_successes_gives_empty_latencies_not_zeros():
    m = _metrics([_failed("HTTP 503: overloaded")])
    assert m.completed == 0 and m.latencies_ms["ttft"]["p99"] is None
    assert m.output_throughput == 0.0 and m.max_concurrent_requests == 0
    assert "Median TTFT (ms):                        n/a" in format_table(m, {"request_rate": 1.0}, ["ttft"])


def test_output_tokens_fall_back_to_the_tokenizer_and_mismatches_are_flagged():
    a = _done(0.0, 0.1, [0.01] * 3)
    a.output_tokens = None
    a.generated_text = "abcdef"                   # the stand-in tokenizer counts characters: 6 tokens, 4 asked
    b = _done(0.0, 0.1, [0.01] * 3, server_prompt=11)
    m = _metrics([a, b])
    assert m.output_tokens_source == "mixed" and m.total_output_tokens == 10
    assert m.output_len_mismatches == 1 and m.prompt_len_mismatches == 1
    assert m.total_input_tokens == 10 + 11
    assert _metrics([a, b], ignore_eos=False).output_len_mismatches == 0


def test_peak_concurrency_and_token_rate():
    outputs = [_done(0.0, 0.5, [0.5]), _done(0.2, 0.1, [0.1]), _done(1.0, 0.1, [0.1])]
    assert peak_concurrency(outputs) == 2   # [0, 1.0) and [0.2, 0.4) overlap; [1.0, 1.2) starts as the first ends
    rates, starts = token_rate_series(outputs, [2, 2, 2], bucket_s=0.5)
    # token arrivals at 0.5, 1.0 | 0.3, 0.4 | 1.1, 1.2
    assert starts.tolist() == [0.0, 0.5, 1.0]
    assert rates.tolist() == [4.0, 2.0, 6.0]
    rates, _ = token_rate_series([outputs[0]], [6], bucket_s=1.0)  # 2 chunks carrying 6 tokens: 3 a chunk
    assert rates.tolist() == [3.0, 3.0]


def test_unfinished_requests_are_neither_successes_nor_failures():
    cancelled = RequestOutput(prompt_len=10, expected_output_len=4)
    cancelled.started, cancelled.cancelled = True, True
    never_sent = RequestOutput(prompt_len=10, expected_output_len=4)
    m = _metrics([_done(0.0, 0.1, [0.01] * 3), cancelled, never_sent])
    assert (m.completed, m.failed, m.incomplete) == (1, 0, 2)
