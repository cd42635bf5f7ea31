"""The speculative-step profiler on CPU at toy size: it runs with and without n-gram drafts, drafts are verified,
and the per-phase host times are reported (and add up to no more than the step)."""

from __future__ import annotations

import json

from benchmarks import profile_spec_step
from tests.frontend.model_files import tiny_llama_dir


def test_profile_runs_with_and_without_speculation(tmp_path, capsys):
    model = tiny_llama_dir(tmp_path / "tiny-llama")
    out = tmp_path / "profile.jsonl"
    assert profile_spec_step.main(["--model", str(model), "--num-seqs", "2", "--k", "0", "3", "--steps", "20",
                                   "--warmup-steps", "10", "--prompt-len", "48", "--max-model-len", "512",
                                   "--num-gpu-blocks-override", "64", "--count-ops", "3", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["num_seqs"], r["k"]) for r in rows] == [(2, 0), (2, 3)]
    plain, spec = rows
    assert plain["tokens_per_step"] == 2  # one token per sequence per decode step
    assert spec["tokens_per_step"] >= 2
    for r in rows:
        phases = r["host_ms_per_step"]
        assert phases["forward"] > 0 and phases["schedule"] > 0 and phases["update"] > 0
        assert sum(ms for name, ms in phases.items() if name != "other") <= r["step_ms"] * 1.01
    assert spec["host_ms_per_step"]["verify"] > 0 and spec["host_ms_per_step"]["propose"] > 0
    assert plain["host_ms_per_step"]["verify"] == 0 and plain["host_ms_per_step"]["sample"] > 0
    # Greedy drafts take the fast verify: the argmax is launched with the forward, the acceptance runs in numpy.
    assert spec["ops_per_step"]["forward"] > 0 and spec["ops_per_step"].get("verify", 0) <= 1
    assert plain["ops_per_step"]["sample"] > 0 and "verify" not in plain["ops_per_step"]
    printed = capsys.readouterr().out
    assert "host ms per step" in printed and "torch ops per step by phase" in printed


def test_continue_prompts_gives_full_acceptance(tmp_path):
    """--continue-prompts rewires the tiny model to continue its prompts' repeated chunk: every n-gram draft is
    accepted, so each speculative step emits 1 + k tokens per sequence (the full-acceptance host cost on CPU)."""
    model = tiny_llama_dir(tmp_path / "tiny-llama")
    out = tmp_path / "profile.jsonl"
    assert profile_spec_step.main(["--model", str(model), "--num-seqs", "1", "2", "--k", "3", "--steps", "10",
                                   "--warmup-steps", "8", "--prompt-len", "48", "--max-model-len", "512",
                                   "--num-gpu-blocks-override", "64", "--continue-prompts",
                                   "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["num_seqs"], r["tokens_per_step"]) for r in rows] == [(1, 4), (2, 8)]


def test_graph_stand_ins_take_the_graph_host_path(tmp_path, monkeypatch):
    """--graph-stand-ins (CPU): decode and verify steps go through the runner's graph path (padded layouts, the
    in-graph argmax, the fast greedy verify), the forward run in place of each replay."""
    import core.model_runner as model_runner

    model = tiny_llama_dir(tmp_path / "tiny-llama")
    out = tmp_path / "profile.jsonl"
    replays = []
    original = profile_spec_step.EagerGraphs.replay
    monkeypatch.setattr(profile_spec_step.EagerGraphs, "replay",
                        lambda self, size: replays.append(self._forward.__name__) or original(self, size))
    eager_logits_rows = []
    monkeypatch.setattr(model_runner, "_verified_rows", lambda *a: eager_logits_rows.append(1))  # eager path only
    assert profile_spec_step.main(["--model", str(model), "--num-seqs", "1", "3", "--k", "0", "3", "--steps", "10",
                                   "--warmup-steps", "8", "--prompt-len", "48", "--max-model-len", "512",
                                   "--num-gpu-blocks-override", "64", "--continue-prompts", "--graph-stand-ins",
                                   "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["num_seqs"], r["k"], r["tokens_per_step"]) for r in rows] == [(1, 0, 1), (1, 3, 4), (3, 0, 3),
                                                                             (3, 3, 12)]
    assert "_decode_forward" in replays and "_verify_graph_forward" in replays and not eager_logits_rows
