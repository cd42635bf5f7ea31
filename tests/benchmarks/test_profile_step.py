"""CPU smoke test of ``benchmarks.profile_step --json-object`` (a GPU tool): the phases print, and under async
scheduling the grammar job starts right after scheduling (on CPU the step in flight is always done by then)."""

from __future__ import annotations

import re

from benchmarks.profile_step import main
from tests.frontend.model_files import tiny_llama_dir


def test_profile_step_json_object_counts_early_grammar_jobs(tmp_path_factory, capsys, monkeypatch):
    import core.model_runner as model_runner
    from core.sampler import Sampler

    # profile_step times these by patching the class / module: put them back afterwards.
    monkeypatch.setattr(model_runner.StepHandle, "result", model_runner.StepHandle.result)
    monkeypatch.setattr(model_runner, "build_sampling_batch", model_runner.build_sampling_batch)
    monkeypatch.setattr(Sampler, "__call__", Sampler.__call__)
    model = tiny_llama_dir(tmp_path_factory.getbasetemp() / "tiny-llama-profile-step")
    argv = ["--model", str(model), "--load-format", "auto", "--max-model-len", "2048", "--num-prompts", "3",
            "--warmup-steps", "3", "--steps", "3", "--json-object", "--async-scheduling", "on"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "grammar bitmask" in out and "grammar prepare" in out
    started = re.search(r"grammar job started right after scheduling in (\d+) of 3 steps \((\d+) looks", out)
    assert started is not None, out
    assert int(started.group(1)) >= 2 and int(started.group(2)) == 0
