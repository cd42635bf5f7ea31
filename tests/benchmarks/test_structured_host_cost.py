"""CPU smoke test of the structured-output host-cost benchmark (batched and per-sequence) on a tiny random model."""

from __future__ import annotations

import json

import pytest

from benchmarks.structured_host_cost import main
from tests.frontend.model_files import tiny_llama_dir


@pytest.mark.parametrize("per_sequence", [False, True])
def test_host_cost_benchmark_runs_both_passes(tmp_path_factory, per_sequence):
    model = tiny_llama_dir(tmp_path_factory.getbasetemp() / "tiny-llama-host-cost")
    out = tmp_path_factory.mktemp("results") / "results.jsonl"
    argv = ["--model", str(model), "--device", "cpu", "--num-requests", "4", "--max-tokens", "8",
            "--max-model-len", "256", "--num-blocks", "64", "--async-scheduling", "on", "--json", str(out)]
    assert main(argv + (["--per-sequence"] if per_sequence else [])) == 0
    record = json.loads(out.read_text())
    assert record["per_sequence"] is per_sequence
    assert record["unconstrained"]["output_tokens"] == 4 * 8
    json_pass = record["json_object"]
    assert 0 < json_pass["output_tokens"] <= 4 * 8
    assert json_pass["mask_fill_s_calls"] >= json_pass["steps"] - 1 and json_pass["mask_apply_s_calls"] > 0
    assert "mask_fill_s_calls" not in record["unconstrained"]  # unconstrained steps never reach the grammar path
    # Async scheduling on CPU: the step in flight is always done once the next is scheduled.
    assert json_pass["early_starts"] >= json_pass["steps"] - 3 and record["unconstrained"].get("early_starts", 0) == 0


@pytest.mark.parametrize("grammar_thread", ["on", "off"])
def test_component_costs_split_the_step(tmp_path_factory, grammar_thread):
    """``--components``: the per-step split through the manager (whose masks it checks against xgrammar's own
    fill every step) with and without the grammar thread."""
    model = tiny_llama_dir(tmp_path_factory.getbasetemp() / "tiny-llama-host-cost")
    out = tmp_path_factory.mktemp("results") / "components.jsonl"
    argv = ["--model", str(model), "--device", "cpu", "--components", "4,16", "--steps", "4", "--warmup-steps", "1",
            "--engine-busy-ms", "1", "--grammar-threads", grammar_thread, "--json", str(out)]
    assert main(argv) == 0
    records = [json.loads(line)["components"] for line in out.read_text().splitlines()]
    assert [r["rows"] for r in records] == [4, 16]
    for r in records:
        assert r["grammar_threads_on"] is (grammar_thread == "on")
        assert r["raw_accept_ms"] > 0 and r["raw_fill_ms"] > 0 and r["engine_thread_cpu_ms"] > 0
        if grammar_thread == "on":
            assert r["job_start_ms"] >= 0 and 0 <= r["job_started_while_busy"] <= 1
        else:  # no grammar thread: nan
            assert r["job_start_ms"] != r["job_start_ms"] and r["job_started_while_busy"] != r["job_started_while_busy"]
