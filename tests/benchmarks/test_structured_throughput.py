"""CPU smoke test of the json_object W1 benchmark on a tiny random model with SmolLM2's tokenizer."""

from __future__ import annotations

import json

from benchmarks.structured_throughput import main
from tests.frontend.model_files import copy_tokenizer_files
from tests.tiny_models import hf_config


def test_json_object_benchmark_runs_both_passes(tmp_path):
    import torch
    import transformers

    model = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(
        hf_config("llama", vocab_size=49152, max_position_embeddings=2048)).save_pretrained(model)
    copy_tokenizer_files(model)
    out = tmp_path / "results.jsonl"
    assert main(["--model", str(model), "--num-prompts", "2", "--runs", "1", "--max-model-len", "2048",
                 "--disable-tqdm", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["unconstrained"]["runs"][0]["output_tokens"] == record["w1_output_tokens"]
    assert 0 < record["json_object"]["runs"][0]["output_tokens"] <= record["w1_output_tokens"]
    assert record["json_object"]["median_output_tok_per_s"] > 0
    same = record["unconstrained_same_lengths"]["runs"][0]["output_tokens"]
    assert same == record["json_object"]["runs"][0]["output_tokens"]  # W1 cut to the constrained outputs' lengths
    assert "json_object_slowdown_same_lengths" in record
