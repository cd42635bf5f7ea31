"""benchmarks/bench_verify_attention.py runs end to end (tiny shapes; interpreted on CPU) and its checks pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_verify_attention_bench_smoke_runs_and_checks_pass():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_verify_attention.py"), "--smoke", "--sweep"],
        capture_output=True, text=True, timeout=300, env={**os.environ}, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for variant in ("varlen", "mq-decode", "mq-decode unfused", "mq-decode 1 split", "decode Q=1"):
        assert f"\n{variant} " in proc.stdout, variant
    assert "## B=1 Q=4 (decode split-K factor 1)" not in proc.stdout  # B=1 exercises the split merges
    assert "\nmq 64/8/2 " in proc.stdout  # --sweep
    assert "# all correctness checks passed" in proc.stdout
