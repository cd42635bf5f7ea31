"""benchmarks/bench_skinny_gemm.py runs end to end (tiny shapes; interpreted on CPU) and its checks pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_script_smoke_runs_and_checks_pass():
    """benchmarks/bench_skinny_gemm.py end to end at tiny shapes (interpreted on CPU): the lead runs it on the H100."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_skinny_gemm.py"), "--smoke"],
        capture_output=True, text=True, timeout=300, env={**os.environ}, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for section in ("## M=1:", "## best per (M, shape)", "SKINNY_CONFIGS", "DEFAULT_CONFIGS", "## whole decode step"):
        assert section in proc.stdout
    assert "Triton tuned (this run)" in proc.stdout
    assert "# all correctness checks passed" in proc.stdout
