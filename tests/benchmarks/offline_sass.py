"""Shared by the offline sm_90 SASS tests: run a compile script in a subprocess without TRITON_INTERPRET (the test
session interprets the kernels) and read the JSON it prints last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

needs_sass_tools = pytest.mark.skipif(not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists(),
                                      reason="this Triton build ships no ptxas / cuobjdump")  # fmt: skip


def run_compile_script(code: str) -> dict:
    """``OFFLINE_SASS_TRITON``: a directory holding another Triton package to compile with (the GPU host's 3.6
    unpacked from its wheel: its compiler makes other layout choices than the one installed here)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    other = os.environ.get("OFFLINE_SASS_TRITON")
    env["PYTHONPATH"] = os.pathsep.join([other, str(ROOT)] if other else [str(ROOT)])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
