"""The offline throughput benchmark: requests drawn as BENCHMARKS.md says, both backends run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.throughput import main, make_workload, parse_args
from tests.tiny_models import hf_config


def test_workloads_follow_the_documented_draws():
    w1 = make_workload("W1")
    rng = np.random.default_rng(0)
    lens_in = rng.integers(100, 1025, size=256)
    lens_out = rng.integers(100, 1025, size=256)
    assert [len(p) for p in w1.prompts] == lens_in.tolist() and w1.max_tokens == lens_out.tolist()
    assert w1.prompts[0] == rng.integers(0, 10000, size=int(lens_in[0])).tolist()
    w4 = make_workload("W4")
    assert len(w4.prompts) == 256 and all(p[:2048] == w4.prompts[0][:2048] for p in w4.prompts)
    assert make_workload("W3").max_tokens == [512] and make_workload("W2").prompts == w1.prompts


def test_pagedserve_and_hf_backends_generate_every_requested_token(tmp_path, capsys):
    import torch
    import transformers

    model = tmp_path / "llama-10k-vocab"  # the workloads draw token ids below 10000
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(
        hf_config("llama", vocab_size=10240, max_position_embeddings=4096)).save_pretrained(model)
    out = tmp_path / "results.jsonl"
    for backend in ("pagedserve", "hf"):
        assert main(["--workload", "W4", "--model", str(model), "--backend", backend, "--num-prompts", "3",
                     "--runs", "1", "--max-model-len", "2304", "--disable-tqdm", "--json", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["backend"] for r in records] == ["pagedserve", "hf"]
    for r in records:
        assert r["runs"][0]["output_tokens"] == 3 * 128 and r["median_output_tok_per_s"] > 0
    # the first request computes the 2048-token prefix, the other two find its 128 blocks in the cache
    assert records[0]["runs"][0]["prefix_cache_hit_rate"] == 2 * 2048 / (3 * 2112)
    assert "median output throughput" in capsys.readouterr().out


def test_keep_prefix_cache_lets_a_later_run_reuse_the_prompts(tmp_path):
    """By default each run starts with an empty prefix cache (no run finds the previous one's prompts); with
    ``--keep-prefix-cache`` the second run of the same prompt hits every block the first one cached but the last
    (2112 tokens = 132 full blocks; the block of the last prompt token is computed again, for its logits)."""
    out = tmp_path / "results.jsonl"
    model = tmp_path / "llama-10k-vocab"
    model.mkdir()
    config = hf_config("llama", vocab_size=10240, max_position_embeddings=4096).to_dict()
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    common = ["--workload", "W4", "--model", str(model), "--load-format", "dummy", "--num-prompts", "1", "--runs",
              "2", "--max-model-len", "2304", "--disable-tqdm", "--json", str(out)]
    assert main(common) == 0 and main([*common, "--keep-prefix-cache"]) == 0
    reset, kept = (json.loads(line)["runs"] for line in out.read_text().splitlines())
    assert [r["prefix_cache_hit_rate"] for r in reset] == [0.0, 0.0]
    assert kept[0]["prefix_cache_hit_rate"] == 0.0 and kept[1]["prefix_cache_hit_rate"] == 131 * 16 / 2112


@pytest.mark.parametrize("extra", [["--backend", "hf"], ["--no-enable-prefix-caching"]])
def test_keep_prefix_cache_without_a_prefix_cache_is_refused(extra, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--workload", "W1", "--keep-prefix-cache", *extra])
    assert "--keep-prefix-cache needs" in capsys.readouterr().err


def test_gemma2_dummy_w2_smoke(tmp_path):
    """The Gemma-2-9B benchmark's path (config only, dummy weights, W2's requests) on a tiny Gemma 2 config: sliding
    window and soft-capping layers run and every requested token comes out."""
    model = tmp_path / "gemma2-10k-vocab"
    model.mkdir()
    config = hf_config("gemma2", vocab_size=10240, max_position_embeddings=4096, sliding_window=256).to_dict()
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["Gemma2ForCausalLM"]}))
    out = tmp_path / "results.jsonl"
    assert main(["--workload", "W2", "--model", str(model), "--load-format", "dummy", "--num-prompts", "1",
                 "--runs", "1", "--max-model-len", "2048", "--disable-tqdm", "--json", str(out)]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["runs"][0]["output_tokens"] == make_workload("W2", 1).max_tokens[0]


def test_moe_dummy_w1_smoke(tmp_path):
    """W7's path (Qwen3-30B-A3B: config only, dummy weights, W1's requests) on a tiny Qwen3-MoE config."""
    model = tmp_path / "qwen3-moe-10k-vocab"
    model.mkdir()
    config = hf_config("qwen3_moe", vocab_size=10240, max_position_embeddings=4096, num_hidden_layers=1,
                       decoder_sparse_step=1).to_dict()  # one sparse layer: fast on CPU
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3MoeForCausalLM"]}))
    out = tmp_path / "results.jsonl"
    assert main(["--workload", "W1", "--model", str(model), "--load-format", "dummy", "--num-prompts", "1",
                 "--runs", "1", "--max-model-len", "2048", "--disable-tqdm", "--json", str(out)]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["runs"][0]["output_tokens"] == make_workload("W1", 1).max_tokens[0]


def test_tensor_parallel_smoke(tmp_path):
    """``--tensor-parallel-size 2`` (the two-GPU measurement's command) on CPU: two ranks over gloo, every requested
    token comes out."""
    import torch
    import transformers

    model = tmp_path / "llama-10k-vocab"
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(
        hf_config("llama", vocab_size=10240, max_position_embeddings=4096)).save_pretrained(model)
    out = tmp_path / "results.jsonl"
    assert main(["--workload", "W4", "--model", str(model), "--tensor-parallel-size", "2", "--num-prompts", "1",
                 "--runs", "1", "--max-model-len", "2304", "--disable-tqdm", "--json", str(out)]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["runs"][0]["output_tokens"] == 128 and record["args"]["tensor_parallel_size"] == 2


def test_moe_tensor_parallel_smoke(tmp_path):
    """The two-GPU MoE measurement's command (``--tensor-parallel-size 2`` on Qwen3-30B-A3B's path: config only,
    dummy weights) on CPU with a tiny Qwen3-MoE config: two ranks over gloo, every requested token comes out."""
    model = tmp_path / "qwen3-moe-10k-vocab"
    model.mkdir()
    config = hf_config("qwen3_moe", vocab_size=10240, max_position_embeddings=4096, num_hidden_layers=1,
                       decoder_sparse_step=1).to_dict()
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3MoeForCausalLM"]}))
    out = tmp_path / "results.jsonl"
    assert main(["--workload", "W4", "--model", str(model), "--load-format", "dummy", "--tensor-parallel-size", "2",
                 "--num-prompts", "1", "--runs", "1", "--max-model-len", "2304", "--disable-tqdm",
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["runs"][0]["output_tokens"] == 128 and record["args"]["tensor_parallel_size"] == 2
