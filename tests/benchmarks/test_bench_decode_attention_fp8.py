"""benchmarks/bench_decode_attention.py --kv-cache-dtype fp8 runs end to end (tiny shapes; interpreted on CPU): fp8
caches read by the decode kernel pass the script's correctness checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_decode_attention_bench_fp8_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_decode_attention.py"), "--smoke", "--kv-cache-dtype", "fp8",
         "--variants", "baseline,fused"],
        capture_output=True, text=True, timeout=300, env={**os.environ}, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "KV cache torch.float8_e4m3fn" in proc.stdout
    assert "# all correctness checks passed" in proc.stdout
