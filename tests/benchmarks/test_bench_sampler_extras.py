"""benchmarks/bench_sampler_extras.py runs end to end at tiny shapes on CPU and its checks pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sampler_extras_benchmark_smoke_runs_and_checks_pass():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sampler_extras.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for case in ("| plain |", "| allowed_token_ids |", "| bad_words |", "| logprob_token_ids |"):
        assert case in proc.stdout
    assert "# all correctness checks passed" in proc.stdout
