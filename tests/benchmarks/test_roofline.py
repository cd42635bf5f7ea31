"""``benchmarks/roofline.py`` (a run's lower bound from its request lengths) and ``benchmarks/step_timeline.py``
(each step of a run against its own bound): the arithmetic on hand-sized cases, and the timeline end to end on CPU."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.roofline import dense_weights, roofline
from benchmarks.step_timeline import StepRecord, main, step_bound, summarize
from tests.frontend.model_files import tiny_llama_dir


def _config(windows: tuple[int, ...] = ()) -> SimpleNamespace:
    return SimpleNamespace(hidden_size=4, intermediate_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
                           head_dim=2, vocab_size=10, sliding_windows=windows)


def test_dense_weights_count_every_linear_layer():
    # per layer: qkv 4 x (4 + 2 + 2) + o 4 x 4 + gate/up/down 3 x 4 x 8 = 32 + 16 + 96; LM head 10 x 4
    assert dense_weights(_config()) == (2 * 144, 40)


def test_roofline_terms_from_request_lengths():
    inputs, outputs = np.array([3, 5]), np.array([2, 4])
    bound = roofline(_config(), inputs, outputs, bandwidth=1.0, flops=1.0)
    # contexts read: request 1: 3, 4; request 2: 5, 6, 7, 8 -> 33 positions per layer, 2 layers, 8 bytes each
    assert bound.decode_attention_s == pytest.approx(33 * 2 * 8)
    assert bound.linear_compute_s == pytest.approx(2 * (14 * 288 + 8 * 40))  # 14 rows; 6 outputs + 2 last tokens
    assert bound.linear_weight_stream_s == pytest.approx(4 * 328 * 2)  # the longest output's steps
    assert bound.prefill_attention_s == pytest.approx(2 * (9 + 25) * 2 * 2 * 2)
    assert bound.total_s == pytest.approx(bound.decode_attention_s + bound.linear_s + bound.prefill_attention_s)
    assert bound.ceiling_tok_s == pytest.approx(6 / bound.total_s)


def test_sliding_window_layers_read_at_most_the_window():
    inputs, outputs = np.array([3, 5]), np.array([2, 4])
    full = roofline(_config(), inputs, outputs, bandwidth=1.0, flops=1.0)
    windowed = roofline(_config((4, 0)), inputs, outputs, bandwidth=1.0, flops=1.0)
    # layer 0 reads min(context, 4): 3, 4, 4, 4, 4, 4 = 23 instead of 33
    assert full.decode_attention_s - windowed.decode_attention_s == pytest.approx((33 - 23) * 8)


def test_step_bound_and_summary_by_kind_of_step():
    cfg = _config()
    decode = StepRecord(seconds=2.0, prefill_tokens=0, decode_contexts=[3, 5])
    kwargs = dict(bandwidth=1.0, flops=1.0)
    # KV 8 positions x 2 layers x 8 bytes; linear max(2 x (2 x 288 + 2 x 40), 328 x 2)
    assert step_bound(cfg, decode, **kwargs) == pytest.approx(8 * 2 * 8 + max(2 * (2 * 288 + 2 * 40), 656))
    prefill = StepRecord(seconds=1.0, prefill_tokens=7, decode_contexts=[4])
    rows = summarize(cfg, [decode, prefill, StepRecord(0.5, 0, [9])])
    assert [r["kind"] for r in rows] == ["prefill or mixed", "decode 1-31"]
    assert rows[0]["steps"] == 1 and rows[0]["prefill_tokens"] == 7 and rows[0]["decode_tokens"] == 1
    assert rows[1]["steps"] == 2 and rows[1]["seconds"] == 2.5 and rows[1]["decode_tokens"] == 3


def test_step_timeline_runs_a_workload_on_cpu(tmp_path_factory, tmp_path, capsys):
    model = tiny_llama_dir(tmp_path_factory.getbasetemp() / "tiny-llama-timeline")
    out_json = tmp_path / "timeline.jsonl"
    assert main(["--workload", "W2", "--model", str(model), "--num-prompts", "1", "--max-model-len", "2048", "--warmup-prompts", "1",
                 "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "prefill or mixed" in printed and "decode 1-31" in printed
    result = json.loads(out_json.read_text())
    decode_tokens = sum(r["decode_tokens"] for r in result["rows"])
    prefill_tokens = sum(r["prefill_tokens"] for r in result["rows"])
    from benchmarks.throughput import make_workload

    workload = make_workload("W2", 1)
    assert prefill_tokens == sum(len(p) for p in workload.prompts)
    assert decode_tokens == sum(workload.max_tokens) - 1  # each request's first token comes from its prefill


def test_an_fp8_cache_halves_the_kv_term_of_the_bound():
    cfg = _config()
    decode = StepRecord(seconds=2.0, prefill_tokens=0, decode_contexts=[3, 5])
    kwargs = dict(bandwidth=1.0, flops=1.0)
    assert step_bound(cfg, decode, kv_bytes=2, **kwargs) - step_bound(cfg, decode, kv_bytes=1, **kwargs) == \
        pytest.approx(8 * 2 * 4)  # 8 positions x 2 layers x 4 bytes fewer (K and V, 2 values each, at 1 byte)
    long = StepRecord(seconds=1.0, prefill_tokens=0, decode_contexts=[10**12])  # KV-bound at H200 bandwidth
    bf16, fp8 = summarize(cfg, [long]), summarize(cfg, [long], kv_bytes=1)
    assert fp8[0]["bound_s"] == pytest.approx(bf16[0]["bound_s"] / 2, rel=1e-3)


def test_step_timeline_warm_run_finds_its_prompts_cached(tmp_path_factory, tmp_path):
    model = tiny_llama_dir(tmp_path_factory.getbasetemp() / "tiny-llama-timeline-warm")
    out_json = tmp_path / "timeline.jsonl"
    assert main(["--workload", "W2", "--model", str(model), "--num-prompts", "1", "--max-model-len", "2048",
                 "--warmup-prompts", "0", "--warm", "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    prefill_tokens = sum(r["prefill_tokens"] for r in result["rows"])
    from benchmarks.throughput import make_workload

    prompt_len = len(make_workload("W2", 1).prompts[0])
    assert 0 < prefill_tokens < 16 < prompt_len  # only the last, partly filled block is computed again
