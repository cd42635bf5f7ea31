"""The fused MoE benchmark and tuning scripts run end to end at tiny shapes (interpreted on CPU) and their checks
pass; the tuner writes a table the kernel then reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)  # fmt: skip


def test_bench_fused_moe_smoke():
    proc = _run("benchmarks.bench_fused_moe", "--smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "# all correctness checks passed" in proc.stdout and "smoke  40  " in proc.stdout


@pytest.mark.parametrize("kind", [("--fp8",), ("--int4",), ("--gguf", "Q8_0"), ("--int8", "gptq"), ("--bnb4", "nvfp4")],
                         ids=["fp8", "int4", "gguf", "gptq8", "nvfp4"])  # fmt: skip
def test_bench_fused_moe_smoke_with_quantized_experts(kind):
    proc = _run("benchmarks.bench_fused_moe", "--smoke", *kind)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "# all correctness checks passed" in proc.stdout and "smoke  40  " in proc.stdout


def test_tune_fused_moe_smoke_writes_table(tmp_path):
    out = tmp_path / "configs.json"
    proc = _run("benchmarks.tune_fused_moe", "--smoke", "--write", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads(out.read_text())["configs"]
    (by_tokens,) = table.values()
    assert set(by_tokens) == {"4", "40"} and all("BLOCK_M" in c for c in by_tokens.values())
    proc = _run("benchmarks.tune_fused_moe", "--smoke", "--fp8", "--write", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = _run("benchmarks.tune_fused_moe", "--smoke", "--int4", "--write", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keys = sorted(json.loads(out.read_text())["configs"])
    # fp8 and int4 experts: entries of their own
    assert len(keys) == 3 and keys[1:] == [keys[0] + ",w=float8_e4m3fn", keys[0] + ",w=int4"]


def test_bench_fused_moe_per_rank_shapes_under_tensor_parallelism():
    """``--tp 2``: each rank's problem, every expert with half its intermediate dimension (what the lead tunes and
    measures for a two-GPU MoE run); the smoke run checks it against the reference."""
    from benchmarks.bench_fused_moe import SHAPES, per_rank_shapes

    qwen3, mixtral = per_rank_shapes(SHAPES, 2)
    assert (qwen3.name, qwen3.num_experts, qwen3.hidden, qwen3.inter) == ("qwen3-30b-a3b-tp2", 128, 2048, 384)
    assert (mixtral.name, mixtral.inter) == ("mixtral-8x7b-tp2", 7168)
    proc = _run("benchmarks.bench_fused_moe", "--smoke", "--tp", "2", "--tokens", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "# all correctness checks passed" in proc.stdout and "smoke-tp2  4  " in proc.stdout
    proc = _run("benchmarks.bench_fused_moe", "--smoke", "--tp", "3")
    assert proc.returncode != 0 and "expert width 32 is not divisible" in proc.stderr
