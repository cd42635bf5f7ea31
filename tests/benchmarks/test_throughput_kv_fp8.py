"""The throughput benchmark's fp8 KV-cache hook (the lead runs W1/W2 with it on the GPU): CPU smoke run end to end."""

from __future__ import annotations

import json

import pytest

from benchmarks.throughput import main, make_workload, parse_args
from tests.tiny_models import hf_config


def test_w1_with_fp8_kv_cache_runs_and_reports_its_blocks(tmp_path):
    import torch
    import transformers

    model = tmp_path / "llama-10k-vocab"  # the workloads draw token ids below 10000
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(
        hf_config("llama", vocab_size=10240, max_position_embeddings=4096)).save_pretrained(model)
    out = tmp_path / "results.jsonl"
    assert main(["--workload", "W1", "--model", str(model), "--num-prompts", "1", "--runs", "1",
                 "--max-model-len", "2048", "--kv-cache-dtype", "fp8", "--disable-tqdm", "--json", str(out)]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["args"]["kv_cache_dtype"] == "fp8"
    assert record["runs"][0]["output_tokens"] == make_workload("W1", 1).max_tokens[0]
    # CPU: the default 1 GiB of cache; tiny llama blocks are 2 layers x (k, v) x 16 tokens x 2 heads x 16 dims, 1 byte
    assert record["runs"][0]["num_kv_blocks"] == 2**30 // 2048


def test_hf_backend_refuses_a_kv_cache_dtype():
    with pytest.raises(SystemExit):
        parse_args(["--backend", "hf", "--kv-cache-dtype", "fp8"])
