"""CPU smoke run of the step-fault recovery benchmark: the culprits alone fail, survivors match the clean run."""

from __future__ import annotations

import json

from benchmarks.step_fault_recovery import main
from tests.tiny_models import hf_config


def test_faults_fail_only_their_requests_and_survivors_match_the_clean_run(tmp_path, capsys):
    import torch
    import transformers

    model = tmp_path / "llama-10k-vocab"  # W1 draws token ids below 10000
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(
        hf_config("llama", vocab_size=10240, max_position_embeddings=2048)).save_pretrained(model)
    out = tmp_path / "results.jsonl"
    assert main(["--model", str(model), "--num-prompts", "6", "--faults", "2", "--fault-after", "3",
                 "--scale-output", "0.01", "--max-model-len", "1100", "--num-gpu-blocks-override", "512",
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["failed"] == record["faults"] == ["0", "3"]
    assert record["survivors_identical"] and record["recomputed_sequences"] > 0
    assert record["clean_tok_per_s"] > 0 and record["faulty_tok_per_s"] > 0
    assert len(record["fault_to_failed_s"]) == 2
