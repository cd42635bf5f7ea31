"""CPU smoke test of the like-for-like json_object step profile (benchmarks/structured_step_phases.py)."""

from __future__ import annotations

import argparse
import json

from benchmarks.structured_step_phases import _workload, main
from tests.frontend.model_files import tiny_llama_dir


def test_json_object_pass_and_unconstrained_pass_run_the_same_batches(tmp_path_factory):
    from core.structured_output import manager

    interval = manager.GRAMMAR_SWITCH_INTERVAL_S
    model = tiny_llama_dir(tmp_path_factory.getbasetemp() / "tiny-llama-step-phases")
    out = tmp_path_factory.mktemp("results") / "phases.jsonl"
    argv = ["--model", str(model), "--num-requests", "4", "--max-tokens", "8", "--temperature", "0",
            "--repeats", "1", "--grammar-thread", "on", "--fill-threads", "2", "--variants", "0:300,2:50",
            "--json", str(out)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert record["grammar_thread"] is True
    assert record["fill_threads"] == 2
    assert [(v["rows_per_fill_thread"], v["switch_interval_us"]) for v in record["variants"]] == [(0, 300), (2, 50)]
    variant = record["variants"][1]
    assert variant["same_batches"] is True
    constrained, plain = variant["json_object"], variant["unconstrained_same_lengths"]
    assert constrained["steps"] == plain["steps"] > 0 and constrained["rows"] == plain["rows"]
    phases = constrained["wall_ms_per_step"]
    # The grammar's phases exist only in the constrained pass; nested phases are counted once (a phase timed inside
    # another, like the update inside launch, counted twice would leave the step's remainder negative).
    assert phases["grammar early look + prepare"] > 0 and phases["grammar bitmask (join + upload)"] > 0
    assert "grammar bitmask (join + upload)" not in plain["wall_ms_per_step"]
    for summary in (phases, plain["wall_ms_per_step"]):
        assert min(summary.values()) >= 0 and summary["other (engine.step glue)"] < summary["step"]
    assert len(variant["ratios"]) == 1 and variant["ratios"][0] > 0
    assert manager.GRAMMAR_SWITCH_INTERVAL_S == interval  # the variants' settings are put back


def test_w1_workload_takes_its_prompts_lengths_and_temperature():
    args = argparse.Namespace(workload="W1", num_requests=8, temperature=None, prompt_len=16, max_tokens=96)
    prompts, max_tokens, temperature = _workload(args)
    assert len(prompts) == len(max_tokens) == 8 and temperature == 0.6
    assert all(100 <= len(p) <= 1024 for p in prompts) and all(100 <= m <= 1024 for m in max_tokens)


def test_host_bound_mode_runs_without_cpu_compute_and_reports_the_grammar_job(tmp_path_factory):
    """``--host-bound``: the forward, logits and sampler are stand-ins (the constrained outputs still follow their
    grammar: the pass runs to the objects' ends), and the grammar job's timeline says where each job started."""
    model = tiny_llama_dir(tmp_path_factory.getbasetemp() / "tiny-llama-step-phases")
    out = tmp_path_factory.mktemp("results-host-bound") / "phases.jsonl"
    argv = ["--model", str(model), "--num-requests", "6", "--max-tokens", "12", "--repeats", "1", "--host-bound",
            "--grammar-thread", "on", "--fill-threads", "1", "--json", str(out)]
    assert main(argv) == 0
    variant = json.loads(out.read_text())["variants"][0]
    assert variant["same_batches"] is True
    constrained = variant["json_object"]["cpu_ms_per_step"]
    assert constrained["forward + logits"] < 1.0  # no CPU forward left in the step
    job = variant["grammar_job"][0]
    assert sum(job["job_started_at"].values()) == variant["json_object"]["steps"]
    assert job["job_started_at"].get("before schedule", 0) >= variant["json_object"]["steps"] - 2
    for name in ("job start delay (submitted -> running)", "job fill", "head start (submitted -> joined)",
                 "join wait (joined -> done)", "job latency (submitted -> done)"):
        assert job["mean"][name] >= 0
    assert job["mean"]["job latency (submitted -> done)"] >= job["mean"]["job fill"]
