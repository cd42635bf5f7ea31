"""benchmarks/bench_gguf_gemm.py end to end at tiny shapes (interpreted on CPU): the lead runs it on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_gguf_gemm_benchmark_smoke_runs_and_checks_pass():
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_gguf_gemm.py"), "--smoke",
                           "--types", "Q4_1", "Q8_0", "Q6_K"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)},
                          cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["Q4_1"], ["Q8_0"], ["Q6_K"])]
    # Q4_1 and Q8_0 at both tiny shapes, Q6_K only where K is a multiple of 256 (both), two M values each
    assert len(rows) == 3 * 2 * 2
    assert "FAILED" not in proc.stdout


def test_word_load_sweep_smoke_ranks_the_kernels():
    """``--sweep-small``: the byte-gather kernel, the default config and the swept ones, each checked, one ranked line
    per (type, M)."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_gguf_gemm.py"), "--smoke",
                           "--types", "Q8_0", "--m", "1", "--sweep-small"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)},
                          cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("Q8_0 M=1:")]
    assert len(lines) == 1 and "old" in lines[0] and "default" in lines[0] and "best" in lines[0]
