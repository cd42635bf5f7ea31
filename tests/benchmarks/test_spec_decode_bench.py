"""The W6 speculative-decoding benchmark on CPU at toy size: its prompt file matches the passages, and a run prints
the table and writes one JSON row per configuration, with the same text with and without n-gram drafts."""

from __future__ import annotations

import json

import pytest

from benchmarks import spec_decode_bench
from tests.frontend.model_files import tiny_llama_dir


def test_prompt_file_is_up_to_date():
    prompts = spec_decode_bench.load_prompts()
    assert len(prompts) == 64
    assert prompts == spec_decode_bench.build_prompts()
    passages = (spec_decode_bench.DATA / "w6_passages.txt").read_text().strip().split("\n===\n")
    assert len(passages) == 8 and all(250 <= len(p.split()) <= 450 for p in passages)


@pytest.mark.parametrize("async_scheduling", ["off", "on"])  # on: speculative steps overlap the output handling
def test_bench_runs_and_reports(tmp_path, capsys, async_scheduling):
    model = tiny_llama_dir(tmp_path / "tiny-llama")
    out = tmp_path / "w6.jsonl"
    assert spec_decode_bench.main(["--model", str(model), "--num-prompts", "2", "--max-tokens", "12",
                                   "--concurrency", "1", "--ks", "0", "3", "5", "--max-model-len", "1024",
                                   "--num-gpu-blocks-override", "128", "--async-scheduling", async_scheduling,
                                   "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["concurrency"], r["k"]) for r in rows] == [(1, 0), (1, 3), (1, 5)]
    assert rows[0]["output_tokens"] == rows[1]["output_tokens"] == rows[2]["output_tokens"] > 0
    assert all(r["tok_per_s"] > 0 for r in rows)
    assert rows[0]["acceptance_rate"] is None and rows[1]["same_text_as_no_spec"] and rows[2]["same_text_as_no_spec"]
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "accept" in printed and "mean len" in printed


def test_bench_runs_each_run_ahead_mode(tmp_path):
    """--run-ahead on off: each k > 0 runs once per mode (run-ahead needs async scheduling: forced on here)."""
    model = tiny_llama_dir(tmp_path / "tiny-llama")
    out = tmp_path / "w6.jsonl"
    assert spec_decode_bench.main(["--model", str(model), "--num-prompts", "2", "--max-tokens", "12",
                                   "--concurrency", "1", "--ks", "0", "3", "--max-model-len", "1024",
                                   "--num-gpu-blocks-override", "128", "--async-scheduling", "on",
                                   "--run-ahead", "on", "off", "--prompt-lookup-min", "1", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["k"], r["run_ahead"]) for r in rows] == [(0, None), (3, "on"), (3, "off")]
    assert rows[1]["prompt_lookup"] == [1, 4] and rows[1]["same_text_as_no_spec"] and rows[2]["same_text_as_no_spec"]
