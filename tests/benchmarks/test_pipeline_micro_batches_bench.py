"""The pipeline micro-batching benchmark end to end on CPU (gloo, a tiny model): every setting (one device, pp=2
one step at a time, pp=2 with two micro-batches in flight) generates every requested token, and the same ones."""

from __future__ import annotations

import json

from benchmarks.pipeline_micro_batches import main
from tests.tiny_models import hf_config


def test_pipeline_micro_batches_benchmark_runs_every_setting(tmp_path, capsys):
    import torch
    import transformers

    model = tmp_path / "llama-1k-vocab"  # the benchmark draws token ids below 1000
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_config("llama", vocab_size=1024)).save_pretrained(model)
    out = tmp_path / "results.jsonl"
    assert main(["--model", str(model), "--dtype", "float32", "-pp", "2", "--single-device", "--num-prompts", "6",
                 "--input-len", "12", "--output-len", "5", "--max-num-seqs", "6", "--runs", "1",
                 "--json", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["pipeline_parallel_size"], r["pipeline_micro_batches"]) for r in records] == [(1, None), (2, 1), (2, 2)]
    assert all(r["same_tokens"] and r["median_output_tok_per_s"] > 0 for r in records)
    printed = capsys.readouterr().out
    assert "greedy tokens identical across settings" in printed and "x one step at a time" in printed
