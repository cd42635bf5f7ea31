"""The GPU kernel benchmark script runs end to end (tiny shapes; interpreted on CPU) and its checks pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_bench_smoke_runs_and_checks_pass():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels_bench.py"), "--smoke"],
        capture_output=True, text=True, timeout=300, env={**os.environ}, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for section in ("paged decode attention", "paged prefill attention", "elementwise kernels", "decode config sweep"):
        assert section in proc.stdout
    assert "# all correctness checks passed" in proc.stdout
