"""The sliding-window block-freeing benchmark on CPU with a tiny model: both modes run and report, freeing holds
about W / block_size + 2 blocks per sequence while holding keeps every block (and, in a small budget, preempts), and
the greedy tokens are the same."""

from __future__ import annotations

import json

from benchmarks import sliding_window_bench
from tests.tiny_models import make_tiny_model


def test_bench_runs_and_reports(tmp_path, capsys):
    model = make_tiny_model(tmp_path, "llama", 0)
    out = tmp_path / "sw.jsonl"
    assert sliding_window_bench.main([
        "--model", str(model), "--sliding-window", "8", "--num-seqs", "3", "--input-len", "10", "--output-len",
        "70", "--num-gpu-blocks", "40", "--block-size", "4", "--json", str(out)]) == 0
    rows = {r["mode"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["freeing"]["most_blocks_held_decoding"] <= 3 * (8 // 4 + 2)
    assert rows["freeing"]["preemptions"] == 0 and rows["holding"]["preemptions"] > 0  # 3 x 20 blocks > 39
    assert rows["holding"]["most_blocks_held_decoding"] > 3 * (8 // 4 + 2)
    assert all(r["out_tok_per_s"] > 0 and r["same_tokens_across_modes"] for r in rows.values())
    assert "freeing / holding" in capsys.readouterr().out
