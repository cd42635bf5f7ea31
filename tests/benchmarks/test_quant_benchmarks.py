"""CPU smoke tests of the quantization benchmarks: throughput with fp8 and with dummy int4 (AWQ layout) weights, and
the KL-divergence quality script with both of its methods."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
                               "--max-tokens", "96", "--group-size", "32", "--fp8-block", "32",
                               "--methods", "fp8", "fp8-block", "awq-rtn", "bnb-int8", "gptq8-rtn", "gptq3-rtn",
                               "ct-w8a16", "nvfp4", "mxfp8", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {r["method"]: r for r in record["results"]}
    methods = ("fp8", "fp8-block", "awq-rtn", "bnb-int8", "gptq8-rtn", "gptq3-rtn", "ct-w8a16", "nvfp4", "mxfp8")
    assert record["tokens"] == 96 and set(rows) == {"none", *methods}
    for eight_bit in ("bnb-int8", "gptq8-rtn", "ct-w8a16", "mxfp8"):  # 8-bit weights: far closer than int4's
        assert rows[eight_bit]["mean_kl"] < rows["awq-rtn"]["mean_kl"] / 4
    # 3 bits a weight, round to nearest: further than int4's (1.03 nats on this random model, awq-rtn's ~0.3)
    assert rows["awq-rtn"]["mean_kl"] < rows["gptq3-rtn"]["mean_kl"] < 3
    for method in methods:
        assert 0 < rows[method]["mean_kl"] < (3 if method == "gptq3-rtn" else 0.5)
        assert 0 < rows[method]["top1_agreement"] <= 1
        assert rows[method]["weight_bytes"] < rows["none"]["weight_bytes"]
    assert "mean KL" in capsys.readouterr().out


def test_quantized_gemm_benchmark_smoke_runs_and_checks_pass():
    """benchmarks/bench_quant_gemm.py end to end at tiny shapes (interpreted on CPU): the lead runs it on the GPU."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_quant_gemm.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300, env={**os.environ}, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for label in ("## tiny_a", "fp8 skinny (w8a16)", "int4 triton (w4a16)", "# all correctness checks passed"):
        assert label in proc.stdout


def test_quantized_gemm_decode_sweep_smoke_prints_tables_and_step_prediction():
    """``bench_quant_gemm.py --sweep`` (the fma decode kernels' config sweep) at a tiny shape, interpreted on CPU:
    every candidate passes its correctness check, and the paste blocks and the step prediction are printed."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_quant_gemm.py"), "--smoke", "--sweep",
                           "--m", "1", "--split-k", "2"],
                          capture_output=True, text=True, timeout=300, env={**os.environ}, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for label in ("## fp8: best table config (fma / mma / mmq)", "## int4: best table config", "FP8_SKINNY_CONFIGS:",
                  "INT4_DEFAULT_CONFIGS:", "(1, 48, 256):", "## predicted W3 decode step", "int4 tuned",
                  "# all correctness checks passed"):
        assert label in proc.stdout, label
    assert "Error" not in proc.stdout  # no candidate failed to run
    # the W8A8 tensor-core kernel ran beside the fma ones (checked against fp8_linear_ref's math) and is in the notes
    assert "mma mma:64x64:w4:s1" in proc.stdout and "mmq mmq:64x64:w4:s1" in proc.stdout
    assert "tiny_b: fma " in proc.stdout and ", mma " in proc.stdout and ", mmq " in proc.stdout
    # the int4 tensor-core kernel's candidates ran too (checked against int4_linear_ref), beside the fma ones
    int4_section = proc.stdout.split("## int4: best table config")[1].split("## paste")[0]
    assert "| mma mma:64x" in int4_section and "| mms mms:64x64" in int4_section and "fma fma:" in int4_section
    # --split-k 2: each tensor-core candidate also ran at two fixed K splits (checked like the others)
    assert re.search(r"mms:64x64:w4:s1 by K split: rule [\d.]+ us, k2 [\d.]+ us", int4_section)
    fp8_section = proc.stdout.split("## fp8: best table config")[1].split("## int4")[0]
    for kind in ("mma", "mmq"):
        assert re.search(kind + r":64x64:w4:s1 by K split: rule [\d.]+ us, k2 [\d.]+ us", fp8_section), kind


def test_quality_script_measures_the_default_gguf_kept_and_repacked(tmp_path, capsys):
    """The default SmolLM2 GGUF in its blocks (``gguf``) and with its Q4 layers repacked for the int4 kernels
    (``gguf-int4``, the CUDA form, bf16 scales and zero points) against the same file dequantized at load."""
    out = tmp_path / "quality.jsonl"
    assert quant_quality.main(["--methods", "gguf", "gguf-int4", "--dtype", "bfloat16", "--max-tokens", "64",
                               "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"none", "gguf", "gguf-int4"}
    assert "120 Q4_0 / Q4_1 / Q4_K layers and expert stacks repacked" in capsys.readouterr().out
    for method in ("gguf", "gguf-int4"):
        assert 0 <= rows[method]["mean_kl"] < 0.01 and rows[method]["top1_agreement"] > 0.9
        assert rows[method]["weight_bytes"] < 0.4 * rows["none"]["weight_bytes"]


def test_bench_weight_only_gemm_smoke():
    """benchmarks/bench_weight_only_gemm.py (NF4 / NVFP4 / 8-bit dense kernels) at tiny shapes, interpreted on CPU:
    each kernel is checked against its format's reference before it is timed."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_weight_only_gemm", "--smoke", "--m", "1", "3"],
                          capture_output=True, text=True, timeout=600, cwd=root,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for fmt in ("nf4", "nvfp4", "int8", "gptq8"):
        assert f"down {fmt} (64, 128) M=3: floor" in proc.stdout and "gemv8x16w2a1" in proc.stdout
