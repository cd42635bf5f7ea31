"""CPU smoke test of the per-phase host-cost benchmark: every phase of a decode step is measured."""

from __future__ import annotations

import json

from benchmarks.host_step_phases import PHASES, main


def test_host_step_phases_measures_every_phase(tmp_path):
    out = tmp_path / "phases.jsonl"
    assert main(["--num-seqs", "4", "--prompt-len", "8", "--warmup-steps", "3", "--steps", "4", "--repeats", "2",
                 "--max-model-len", "128", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    ms = record["ms_per_step"]
    assert record["num_seqs"] == 4 and record["repeats"] == 2 and record["async_scheduling"] == "on"
    assert set(PHASES) <= set(ms)
    for phase in ("schedule", "build message", "apply message to worker batch", "stage inputs", "update"):
        assert ms[phase] > 0, phase
    assert ms["step wall"] >= ms["schedule"] + ms["build message"] + ms["update"]
