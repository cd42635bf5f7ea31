"""benchmarks/gluon_decode_sass.py compiles the Gluon fp8 decode kernel for sm_90 without a GPU and pins what it is
for: a key-tile loop with no shared-memory instruction and no barrier (the fp8 tiles reach the tensor cores through
registers: 16-byte loads, packed e4m3 -> fp16 conversions, mma.sync), and no spills.

Compiled in a subprocess without TRITON_INTERPRET (the test session interprets the kernels)."""

from __future__ import annotations

import pytest

from tests.benchmarks.offline_sass import needs_sass_tools, run_compile_script

COMPILE = """
import json
from benchmarks.gluon_decode_sass import compile_gluon_decode, summarize
out = {group: summarize(compile_gluon_decode(group)) for group in (2, 4)}
out["ring"] = summarize(compile_gluon_decode(4, stages=2))
print(json.dumps(out))
"""


@needs_sass_tools
def test_gluon_decode_loop_keeps_fp8_tiles_out_of_shared_memory():
    """Registers only (``STAGES = 0``): no shared memory in the loop; the ring (``STAGES = 2``): 16-byte cp.async
    in, 16-byte loads out, nothing else."""
    pytest.importorskip("triton.experimental.gluon")
    result = run_compile_script(COMPILE)
    ring = result.pop("ring")["loop"]  # the cp.async ring: one trip through shared memory, 16 bytes at a time
    assert ring.get("LDGSTS.E.BYPASS.128", 0) == 16 and ring.get("LDS.128", 0) == 16, ring
    assert not any(op.startswith(("STS", "LDSM")) for op in ring), ring
    for group, info in result.items():
        loop = info["loop"]
        assert not any(op.startswith(("STS", "LDS", "LDSM", "BAR", "STSM")) for op in loop), (group, loop)
        assert loop.get("LDG.E.128", 0) == 16, (group, loop)  # K: 4 keys x 32 B, V: 8 keys x 16 B per thread
        assert loop.get("HMMA.16816.F32", 0) == 64, (group, loop)  # 32 for q @ K^T, 32 for p @ V per warp
        assert loop.get("F2FP.F16.E4M3.UNPACK_B", 0) == 128, (group, loop)  # 256 fp8 values per thread, 2 each
        assert info["stack"] == 0 and info["registers"] <= 192, (group, info["registers"])
