"""CPU smoke tests of the quantization benchmarks: throughput with fp8 and with dummy int4 (AWQ layout) weights, and
the KL-divergence quality script with both of its methods."""

from __future__ import annotations

import json

import torch

from benchmarks import quant_quality
from benchmarks.throughput import main as throughput_main
from benchmarks.throughput import make_workload
from tests.tiny_models import hf_config

SMOLLM2_VOCAB = 49152


def tiny_llama(path, vocab_size: int):
    import transformers

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(
        hf_config("llama", vocab_size=vocab_size, max_position_embeddings=4096)).save_pretrained(path)
    return path


def test_throughput_with_fp8_and_dummy_awq_weights(tmp_path):
    model = tiny_llama(tmp_path / "llama-10k-vocab", 10240)
    out = tmp_path / "results.jsonl"
    common = ["--workload", "W5", "--model", str(model), "--num-prompts", "1", "--runs", "1",
              "--max-model-len", "1024", "--disable-tqdm", "--json", str(out)]
    assert throughput_main(common + ["--quantization", "fp8", "--load-format", "dummy"]) == 0
    assert throughput_main(common + ["--dummy-int4", "awq", "--dummy-group-size", "32"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["args"]["quantization"], r["args"]["dummy_int4"]) for r in records] == [("fp8", None), (None, "awq")]
    for record in records:
        assert record["runs"][0]["output_tokens"] == make_workload("W5", 1).max_tokens[0]


def test_quality_script_reports_kl_for_each_method(tmp_path, capsys):
    model = tiny_llama(tmp_path / "llama-smollm2-vocab", SMOLLM2_VOCAB)
    out = tmp_path / "quality.jsonl"
    assert quant_quality.main(["--model", str(model), "--tokenizer", "HuggingFaceTB/SmolLM2-135M-Instruct",
                               "--max-tokens", "96", "--group-size", "32", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {r["method"]: r for r in record["results"]}
    assert record["tokens"] == 96 and set(rows) == {"none", "fp8", "awq-rtn"}
    for method in ("fp8", "awq-rtn"):
        assert 0 < rows[method]["mean_kl"] < 0.5 and 0 < rows[method]["top1_agreement"] <= 1
        assert rows[method]["weight_bytes"] < rows["none"]["weight_bytes"]
    assert "mean KL" in capsys.readouterr().out
