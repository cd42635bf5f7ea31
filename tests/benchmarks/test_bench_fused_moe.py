"""The fused MoE benchmark and tuning scripts run end to end at tiny shapes (interpreted on CPU) and their checks
pass; the tuner writes a table the kernel then reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)  # fmt: skip


def test_bench_fused_moe_smoke():
    proc = _run("benchmarks.bench_fused_moe", "--smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "# all correctness checks passed" in proc.stdout and "smoke  40  " in proc.stdout


def test_tune_fused_moe_smoke_writes_table(tmp_path):
    out = tmp_path / "configs.json"
    proc = _run("benchmarks.tune_fused_moe", "--smoke", "--write", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads(out.read_text())["configs"]
    (by_tokens,) = table.values()
    assert set(by_tokens) == {"4", "40"} and all("BLOCK_M" in c for c in by_tokens.values())
