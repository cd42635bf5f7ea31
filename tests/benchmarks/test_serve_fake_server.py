"""The load generator against a test-double OpenAI server: protocol, metrics, files, failures, load shaping."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.serve import main
from core.model_source import DEFAULT_MODEL

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(server, tmp_path: Path, *extra: str, name: str = "result.json", plots: bool = False) -> tuple[int, dict | None]:
    argv = [
        "--base-url", server.url, "--model", "fake-model", "--tokenizer", DEFAULT_MODEL,
        "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "8",
        "--num-prompts", "12", "--max-concurrency", "4", "--ignore-eos", "--seed", "0",
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", name, "--disable-tqdm",
        "--ready-check-timeout-sec", "10", *extra, *([] if plots else ["--no-plots"]),
    ]
    rc = main(argv)
    path = tmp_path / name
    return rc, (json.loads(path.read_text()) if path.exists() else None)


def _assert_valid_png(path: str) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 200 and image.size[1] > 200


@pytest.fixture(autouse=True)
def _tokenizer_loaded_once(bench_tokenizer):
    return bench_tokenizer


def test_completions_run_sends_fair_requests_and_reports_every_metric(fake_server, tmp_path, capsys):
    fake_server.state.token_delay = 0.002
    rc, result = _run(fake_server, tmp_path, plots=True)
    assert rc == 0
    bodies = fake_server.state.bodies
    assert len(bodies) == 12
    for body in bodies:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["max_tokens"] == 8 and body["ignore_eos"] is True and body["temperature"] == 0.0
        assert body["model"] == "fake-model" and isinstance(body["prompt"], str)
    assert result["completed"] == 12 and result["failed"] == 0 and result["failure_reasons"] == {}
    assert result["total_output_tokens"] == 12 * 8 and result["output_tokens_source"] == "usage"
    assert result["output_len_mismatches"] == 0
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            assert isinstance(result[f"{stat}_{metric}_ms"], float), (stat, metric)
    assert 0 < result["median_ttft_ms"] <= result["median_e2el_ms"]
    assert result["p99_ttft_ms"] <= result["p99_e2el_ms"]
    assert result["median_tpot_ms"] >= 2.0 * 0.9  # the server sleeps 2 ms between tokens
    assert result["request_throughput"] == pytest.approx(12 / result["duration"])
    assert result["output_throughput"] == pytest.approx(96 / result["duration"])
    assert result["max_concurrent_requests"] <= 4
    assert len(result["plots"]) == 2
    for plot in result["plots"]:
        _assert_valid_png(plot)
    table = capsys.readouterr().out
    for label in ("Successful requests:", "Request throughput (req/s):", "Output token throughput (tok/s):",
                  "Median TTFT (ms):", "P99 TPOT (ms):", "P90 ITL (ms):", "Mean E2EL (ms):"):
        assert label in table


def test_prompt_tokens_are_exact_through_the_tokenizer(fake_server, tmp_path, bench_tokenizer):
    _run(fake_server, tmp_path, "--random-input-len", "33")
    prompts = [body["prompt"] for body in fake_server.state.bodies]
    assert [bench_tokenizer.count(p) for p in prompts] == [33] * 12


def test_same_seed_sends_the_same_requests(fake_server, tmp_path):
    _run(fake_server, tmp_path, name="a.json")
    first = [b["prompt"] for b in fake_server.state.bodies]
    fake_server.state.bodies.clear()
    _run(fake_server, tmp_path, name="b.json")
    assert sorted(first) == sorted(b["prompt"] for b in fake_server.state.bodies)
    fake_server.state.bodies.clear()
    _run(fake_server, tmp_path, "--seed", "1", name="c.json")
    assert set(first).isdisjoint(b["prompt"] for b in fake_server.state.bodies)


def test_chat_backend_skips_the_role_chunk_and_sends_messages(fake_server, tmp_path):
    fake_server.state.first_token_delay = 0.05
    rc, result = _run(fake_server, tmp_path, "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
                      "--save-detailed")
    assert rc == 0 and result["completed"] == 12
    body = fake_server.state.bodies[0]
    assert body["messages"][0]["role"] == "user" and body["max_completion_tokens"] == 8
    # the role-only opener comes at once, the first token only after 50 ms: TTFT is the latter
    assert min(result["ttfts"]) >= 0.045
    assert [len(itl) for itl in result["itls"]] == [7] * 12
    assert result["total_output_tokens"] == 96


def test_server_errors_are_failures_with_reasons_not_crashes(fake_server, tmp_path, capsys):
    fake_server.state.mode = "http_error"
    rc, result = _run(fake_server, tmp_path, plots=True)
    assert rc == 1
    assert result["completed"] == 0 and result["failed"] == 12
    assert result["failure_reasons"] == {"HTTP 500: engine is on fire": 12}
    assert result["median_ttft_ms"] is None and result["output_throughput"] == 0
    for plot in result["plots"]:
        _assert_valid_png(plot)
    out = capsys.readouterr().out
    assert "Failed requests:" in out and "12 x HTTP 500: engine is on fire" in out


def test_partial_failures_keep_the_successes(fake_server, tmp_path):
    fake_server.state.mode = "every_third_fails"
    rc, result = _run(fake_server, tmp_path)
    assert rc == 1
    assert result["completed"] == 8 and result["failed"] == 4
    assert result["total_output_tokens"] == 8 * 8


@pytest.mark.parametrize("mode, reason", [
    ("error_event", "stream error: KV cache exploded"),
    ("truncate", "stream ended before data: [DONE]"),
])
def test_broken_streams_are_failures(fake_server, tmp_path, mode, reason):
    fake_server.state.mode = mode
    rc, result = _run(fake_server, tmp_path)
    assert rc == 1 and result["failed"] == 12 and result["failure_reasons"] == {reason: 12}


def test_output_tokens_are_counted_by_tokenizer_without_usage(fake_server, tmp_path):
    fake_server.state.mode = "no_usage"
    rc, result = _run(fake_server, tmp_path)
    assert rc == 0
    assert result["output_tokens_source"] == "tokenizer" and result["total_output_tokens"] == 96


def test_max_concurrency_caps_requests_in_flight(fake_server, tmp_path):
    fake_server.state.token_delay = 0.005
    rc, result = _run(fake_server, tmp_path, "--max-concurrency", "3")
    assert rc == 0
    assert fake_server.state.max_in_flight == 3
    assert result["max_concurrent_requests"] == 3


def test_duration_bounds_the_run(fake_server, tmp_path):
    fake_server.state.token_delay = 0.1  # 8 tokens: ~0.7 s a request, 12 requests at concurrency 4: ~2.1 s
    began = time.perf_counter()
    rc, result = _run(fake_server, tmp_path, "--duration", "1.0")
    assert time.perf_counter() - began < 8  # includes tokenizer and set-up
    assert result["duration"] == pytest.approx(1.0, abs=0.05)
    assert result["completed"] == 4 and result["incomplete"] == 8 and result["failed"] == 0
    assert rc == 0


def test_request_rate_spreads_arrivals(fake_server, tmp_path):
    rc, result = _run(fake_server, tmp_path, "--request-rate", "20", "--max-concurrency", "64", "--save-detailed")
    assert rc == 0
    starts = sorted(result["start_times"])
    # the last request goes out at n / rate = 0.6 s after the first (the gaps are rescaled to that, as in vLLM)
    assert starts[-1] - starts[0] == pytest.approx(12 / 20, abs=0.1)
    assert len(result["ttfts"]) == 12 and len(result["itls"][0]) == 7


def test_api_key_is_sent_as_bearer_token(fake_server, tmp_path):
    rc, _ = _run(fake_server, tmp_path, "--api-key", "sekrit", "--num-prompts", "2")
    assert rc == 0
    assert fake_server.state.auth_headers == ["Bearer sekrit"] * 2


def test_unreachable_server_is_an_error_not_a_traceback(tmp_path, capsys):
    from tests.benchmarks.conftest import _free_port

    rc = main(["--base-url", f"http://127.0.0.1:{_free_port()}", "--model", "m", "--tokenizer", DEFAULT_MODEL,
               "--ready-check-timeout-sec", "0.5", "--disable-tqdm"])
    assert rc == 1
    assert "no server answered" in capsys.readouterr().err


def test_backend_and_endpoint_must_agree():
    with pytest.raises(SystemExit) as e:
        main(["--backend", "openai-chat", "--endpoint", "/v1/completions"])
    assert e.value.code == 2


def test_model_defaults_to_the_servers_first_model(fake_server, tmp_path):
    argv = ["--base-url", fake_server.url, "--tokenizer", DEFAULT_MODEL, "--random-input-len", "8",
            "--random-output-len", "2", "--num-prompts", "2", "--disable-tqdm"]
    assert main(argv) == 0
    assert [b["model"] for b in fake_server.state.bodies] == ["fake-model"] * 2


def test_prefix_repetition_dataset_from_the_command_line(fake_server, tmp_path, bench_tokenizer):
    rc, result = _run(fake_server, tmp_path, "--dataset-name", "prefix_repetition",
                      "--prefix-repetition-prefix-len", "20", "--prefix-repetition-suffix-len", "5",
                      "--prefix-repetition-num-prefixes", "3", "--prefix-repetition-output-len", "4")
    assert rc == 0 and result["completed"] == 12 and result["total_output_tokens"] == 48
    ids = [bench_tokenizer.encode(b["prompt"]) for b in fake_server.state.bodies]
    assert all(len(i) == 25 for i in ids) and len({tuple(i[:20]) for i in ids}) == 3
    assert all(b["max_tokens"] == 4 for b in fake_server.state.bodies)


def test_custom_jsonl_conversations_to_the_chat_endpoint(fake_server, tmp_path):
    data = tmp_path / "convos.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in [
        {"messages": [{"role": "user", "content": "Hello"}], "output_tokens": 3},
        {"prompt": "Name three colours."},
    ]))
    rc, result = _run(fake_server, tmp_path, "--backend", "openai-chat", "--dataset-name", "custom",
                      "--dataset-path", str(data), "--num-prompts", "4", "--custom-output-len", "5",
                      "--disable-shuffle")
    assert rc == 0 and result["completed"] == 4 and result["total_output_tokens"] == 3 + 5 + 3 + 5
    sent = [(b["messages"], b["max_completion_tokens"]) for b in fake_server.state.bodies]
    assert sorted(map(json.dumps, sent)) == sorted(map(json.dumps, [
        ([{"role": "user", "content": "Hello"}], 3), ([{"role": "user", "content": "Name three colours."}], 5)] * 2))
