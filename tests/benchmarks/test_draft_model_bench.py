"""The draft-model mechanics benchmark on CPU with tiny models: every configuration runs and reports, the target as
its own draft accepts (nearly) everything and emits more than one token per step, another model's drafts do not."""

from __future__ import annotations

import json

from benchmarks import draft_model_bench
from tests.tiny_models import make_tiny_model


def test_bench_runs_and_reports(tmp_path, capsys):
    target = make_tiny_model(tmp_path, "llama", 0)
    draft = make_tiny_model(tmp_path, "qwen3", 1)
    out = tmp_path / "draft.jsonl"
    assert draft_model_bench.main(["--model", str(target), "--draft-model", str(draft), "--batch-sizes", "1", "3",
                                   "--ks", "2", "--input-len", "8", "--output-len", "12", "--max-model-len", "256",
                                   "--num-gpu-blocks-override", "64", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["config"], r["k"], r["batch_size"]) for r in rows] == [
        ("plain", 0, 1), ("plain", 0, 3), ("draft", 2, 1), ("draft", 2, 3), ("self", 2, 1), ("self", 2, 3)]
    assert all(r["decode_steps"] > 0 and r["tok_per_s"] > 0 and r["step_vs_plain"] > 0 for r in rows)
    by = {(r["config"], r["batch_size"]): r for r in rows}
    for b in (1, 3):
        assert by[("plain", b)]["tokens_per_seq_step"] == 1.0 and by[("plain", b)]["propose_ms"] == 0
        assert by[("self", b)]["acceptance_rate"] > 0.9 and by[("self", b)]["tokens_per_seq_step"] > 1.5
        assert by[("draft", b)]["acceptance_rate"] < 0.5 and by[("draft", b)]["propose_ms"] > 0
    assert "verify" in capsys.readouterr().out
