"""CPU smoke test of benchmarks/run_w5_matrix.sh: a real server per run, the W5 client, one summary line each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.frontend.model_files import tiny_llama_dir
from tests.frontend.server_process import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a server start and a small W5 load: 25-70 s on the shared 2-core box
def test_matrix_runs_w5_and_prints_one_summary_line(tmp_path):
    model = tiny_llama_dir(tmp_path / "tiny-llama")
    out = tmp_path / "w5"
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               NUM_PROMPTS="2", CONCURRENCIES="2", API_SERVER_COUNT="1", PORT=str(free_port()),
               SERVER_ARGS="--max-model-len 1024 --num-gpu-blocks-override 256")
    proc = subprocess.run(["bash", "benchmarks/run_w5_matrix.sh", str(model), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = proc.stdout.split("=== summary")[1].strip().splitlines()[1:]
    assert len(summary) == 1, proc.stdout
    line = summary[0]
    assert line.startswith("w5-c2-base: ") and "FAILED" not in line, line
    for field in ("req/s", "TTFT p50/p99", "ITL p50/p99", "TPOT p50/p99", "out tok/s", "gaps above ITL p99",
                  "API loop lag > 10 ms", "API GC pauses", "core GC: gen0", "--num-gpu-blocks-override 256"):
        assert field in line, (field, line)
    assert (out / "w5-c2-base" / "w5-c2-base.json").is_file()
