"""CPU smoke test of the json_object W1 benchmark on a tiny random model with SmolLM2's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.structured_throughput import main, model_with_tokenizer_vocab
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
    # seed 80: W1's two requests ask for 100 and 117 tokens (seed 0: 572 and 349), so the three passes stay short
    assert main(["--model", str(model), "--num-prompts", "2", "--runs", "1", "--max-model-len", "2048",
                 "--seed", "80", "--disable-tqdm", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["unconstrained"]["runs"][0]["output_tokens"] == record["w1_output_tokens"]
    assert 0 < record["json_object"]["runs"][0]["output_tokens"] <= record["w1_output_tokens"]
    assert record["json_object"]["median_output_tok_per_s"] > 0
    same = record["unconstrained_same_lengths"]["runs"][0]["output_tokens"]
    assert same == record["json_object"]["runs"][0]["output_tokens"]  # W1 cut to the constrained outputs' lengths
    assert "json_object_slowdown_same_lengths" in record


def _qwen3_config_only(directory):
    directory.mkdir()
    config = hf_config("qwen3", vocab_size=151936, max_position_embeddings=2048, eos_token_id=151645).to_dict()
    (directory / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3ForCausalLM"]}))
    return directory


def test_json_object_benchmark_runs_a_config_only_model_with_tokenizer(tmp_path):
    """W1's own model ships as a config without a tokenizer: ``--tokenizer`` gives the grammar one, and
    ``--vocab-from-tokenizer`` gives the model that tokenizer's vocabulary."""
    model = _qwen3_config_only(tmp_path / "qwen3-config-only")
    tokenizer = copy_tokenizer_files(tmp_path / "tokenizer")
    out = tmp_path / "results.jsonl"
    assert main(["--model", str(model), "--load-format", "dummy", "--tokenizer", str(tokenizer),
                 "--vocab-from-tokenizer", "--num-prompts", "1", "--runs", "1", "--max-model-len", "2048",
                 "--seed", "34", "--disable-tqdm", "--json", str(out)]) == 0  # seed 34: 103 tokens (seed 0: 689)
    record = json.loads(out.read_text())
    assert 0 < record["json_object"]["runs"][0]["output_tokens"] <= record["w1_output_tokens"]


def test_vocab_from_tokenizer_resizes_the_config(tmp_path):
    model = _qwen3_config_only(tmp_path / "qwen3-config-only")
    tokenizer = copy_tokenizer_files(tmp_path / "tokenizer")
    (tmp_path / "resized").mkdir()
    config = json.loads((Path(model_with_tokenizer_vocab(str(model), str(tokenizer), str(tmp_path / "resized")))
                         / "config.json").read_text())
    assert (config["vocab_size"], config["eos_token_id"]) == (49152, 2)
    assert config["num_hidden_layers"] == json.loads((model / "config.json").read_text())["num_hidden_layers"]


def test_a_tokenizer_far_shorter_than_the_vocabulary_is_reported(tmp_path, capsys):
    from benchmarks.structured_throughput import _warn_on_vocabulary_gap

    model = _qwen3_config_only(tmp_path / "qwen3-config-only")
    _warn_on_vocabulary_gap(str(model), str(copy_tokenizer_files(tmp_path / "tokenizer")))
    assert "102784 of the model's 151936 ids are not in the tokenizer" in capsys.readouterr().err
