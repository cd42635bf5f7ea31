"""benchmarks/bench_decode_attention.py runs end to end (tiny shapes; interpreted on CPU) and its checks pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_decode_attention_bench_smoke_runs_and_checks_pass():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_decode_attention.py"), "--smoke"],
        capture_output=True, text=True, timeout=300, env={**os.environ}, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "best variant per case" in proc.stdout
    assert "lpt-db32-fused +order" in proc.stdout  # the caller-order run of an LPT variant
    assert "# all correctness checks passed" in proc.stdout
