"""`pagedserve bench serve` against a real `pagedserve serve` (default model, SmolLM2-135M, CPU): issue 6's test.

A small load (20 requests, concurrency 4, short prompts and outputs) so the module stays within a couple of minutes
on 2 CPU cores; one server serves the whole module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.serve import main
from core.model_source import DEFAULT_MODEL

NUM_PROMPTS, CONCURRENCY, INPUT_LEN, OUTPUT_LEN = 20, 4, 24, 6


@pytest.fixture(scope="module")
def server(smollm_server):
    # tests/conftest.py: the session's one SmolLM2 server (one intra-op thread, as tests/conftest.py sets for every
    # process: on a busy 2-core machine a tiny decode matmul takes 20x longer with 2 threads than with 1)
    return smollm_server


def _bench(server, out_dir: Path, *extra: str) -> tuple[int, dict]:
    rc = main([
        "--backend", "vllm", "--base-url", server.url, "--dataset-name", "random",
        "--random-input-len", str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN),
        "--num-prompts", str(NUM_PROMPTS), "--max-concurrency", str(CONCURRENCY), "--ignore-eos", "--seed", "0",
        "--save-result", "--save-detailed", "--result-dir", str(out_dir), "--result-filename", "run.json",
        "--disable-tqdm", "--ready-check-timeout-sec", "30", *extra,
    ])
    # strict JSON: no NaN or Infinity
    return rc, json.loads((out_dir / "run.json").read_text(), parse_constant=_reject_constant)


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def test_small_load_against_pagedserve(server, tmp_path, capsys):
    rc, result = _bench(server, tmp_path)
    table = capsys.readouterr().out
    assert rc == 0, table
    assert result["completed"] == NUM_PROMPTS and result["failed"] == 0 and result["failure_reasons"] == {}
    assert result["model_id"] == DEFAULT_MODEL  # asked the server's /v1/models
    # exact lengths: the server counted the prompt tokens the benchmark built, and generated exactly max_tokens
    assert result["output_tokens_source"] == "usage"
    assert result["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS
    assert result["input_lens"] == [INPUT_LEN] * NUM_PROMPTS
    assert result["prompt_len_mismatches"] == 0 and result["output_len_mismatches"] == 0
    assert result["total_input_tokens"] == NUM_PROMPTS * INPUT_LEN
    assert result["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    # every metric present, positive and consistent
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            assert isinstance(result[f"{stat}_{metric}_ms"], float), (stat, metric)
        assert 0 < result[f"median_{metric}_ms"] <= result[f"p90_{metric}_ms"] <= result[f"p99_{metric}_ms"]
    for ttft, e2el, itl in zip(result["ttfts"], result["e2els"], result["itls"]):
        assert 0 < ttft <= e2el
        assert len(itl) == OUTPUT_LEN - 1  # one SSE chunk per token
        assert e2el == pytest.approx(ttft + sum(itl))
    assert result["request_throughput"] == pytest.approx(NUM_PROMPTS / result["duration"])
    assert result["output_throughput"] == pytest.approx(NUM_PROMPTS * OUTPUT_LEN / result["duration"])
    assert result["total_token_throughput"] == pytest.approx(
        NUM_PROMPTS * (INPUT_LEN + OUTPUT_LEN) / result["duration"])
    assert 1 <= result["max_concurrent_requests"] <= CONCURRENCY
    assert result["max_output_tokens_per_s"] > 0
    assert all(text for text in result["generated_texts"])
    for plot in result["plots"]:
        with Image.open(plot) as image:
            assert image.format == "PNG" and image.size[0] > 200
            image.load()  # decodes the whole file: a truncated PNG raises
    assert "Serving Benchmark Result" in table and "Median TTFT (ms):" in table


def test_chat_endpoint_against_pagedserve(server, tmp_path):
    rc, result = _bench(server, tmp_path, "--backend", "openai-chat", "--num-prompts", "4")
    assert rc == 0
    assert result["completed"] == 4 and result["output_lens"] == [OUTPUT_LEN] * 4
    assert all(0 < t <= e for t, e in zip(result["ttfts"], result["e2els"]))
    assert [len(itl) for itl in result["itls"]] == [OUTPUT_LEN - 1] * 4  # the role-only opener is not a token


def test_server_errors_are_reported_as_failures(server, tmp_path, capsys):
    rc, result = _bench(server, tmp_path, "--served-model-name", "no-such-model", "--tokenizer", DEFAULT_MODEL)
    assert rc == 1
    assert result["completed"] == 0 and result["failed"] == NUM_PROMPTS
    [(reason, count)] = result["failure_reasons"].items()
    assert count == NUM_PROMPTS and reason.startswith("HTTP 4") and "no-such-model" in reason
    assert result["median_ttft_ms"] is None
    assert "Failed requests:                         20" in capsys.readouterr().out
