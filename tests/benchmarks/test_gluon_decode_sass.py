"""benchmarks/gluon_decode_sass.py compiles the Gluon fp8 decode kernel for sm_90 without a GPU and pins the path its
fp8 tiles take: 16-byte cp.async into shared memory, 16-byte loads straight into the mma fragments, packed e4m3 ->
fp16 conversions, mma.sync; no shared-memory store or ldmatrix (the Triton kernel's second and third trips), and no
spills at the compiler's own register count, which stays within 128 so that 4 programs share an SM.

Compiled in a subprocess without TRITON_INTERPRET (the test session interprets the kernels)."""

from __future__ import annotations

import pytest

from tests.benchmarks.offline_sass import needs_sass_tools, run_compile_script

COMPILE = """
import json
from benchmarks.gluon_decode_sass import compile_gluon_decode, summarize
print(json.dumps({group: summarize(compile_gluon_decode(group)) for group in (2, 4)}))
"""


@needs_sass_tools
def test_gluon_decode_loop_takes_fp8_tiles_through_shared_memory_once():
    pytest.importorskip("triton.experimental.gluon")
    for group, info in run_compile_script(COMPILE).items():
        loop = info["loop"]
        # per thread and tile (16 keys a warp): K 2 keys x 32 B, V 4 keys x 16 B, copied in and read out 16 bytes
        # at a time
        assert loop.get("LDGSTS.E.BYPASS.128", 0) == 8 and loop.get("LDS.128", 0) == 8, (group, loop)
        assert not any(op.startswith(("STS", "LDSM")) for op in loop), (group, loop)
        # per warp: q @ K^T 2 key tiles x 8 steps of 16 dims; out^T += V^T @ p^T 8 tiles of 16 dims x 1 step
        assert loop.get("HMMA.16816.F32", 0) == 24, (group, loop)
        assert loop.get("F2FP.F16.E4M3.UNPACK_B", 0) == 64, (group, loop)  # 128 fp8 values per thread, 2 each
        assert info["stack"] == 0 and info["registers"] <= 128, (group, info["registers"])
