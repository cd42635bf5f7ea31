"""benchmarks/bench_decode_attention.py --kv-cache-dtype fp8 runs end to end (tiny shapes; interpreted on CPU): the
16-bit cache, every fp8 read path and the sweep pass the script's correctness checks, and it prints the fp8 default
config line to paste."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_decode_attention_bench_fp8_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_decode_attention.py"), "--smoke", "--kv-cache-dtype", "fp8",
         "--cases", "smoke1", "--variants", "fused"],
        capture_output=True, text=True, timeout=300, env={**os.environ}, cwd=ROOT,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "KV cache torch.float8_e4m3fn" in out
    for run in ("float16 cache", "fp8 upcast (first path)", "fp8 f16 dots", "fp8 default FP8_DECODE_CONFIG",
                "fp8 variant fused", "sweep f16-vpairs 16/4/2", "sweep f16-vpairs 32/4/3",
                "sweep f16-vsplit 32/4/2 lpt maxnreg=128"):
        assert re.search(rf"^smoke1\s+{re.escape(run)}.*\bok$", out, re.M), run
    assert "% of 4.28 TB/s" in out
    assert re.search(r"^FP8_DECODE_CONFIG = DecodeConfig\(tile_n=(16|32|64|128), num_warps=4, num_stages=(2|3), "
                     r'order="lpt", fused_reduce=False, fp8_path="(f16-vpairs|f16|f16-vsplit|gluon)"(, max_registers=128)?\)$', out, re.M)  # fmt: skip
    assert "# all correctness checks passed" in out
