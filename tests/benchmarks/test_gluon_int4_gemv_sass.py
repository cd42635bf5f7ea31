"""benchmarks/gluon_int4_gemv_sass.py compiles the Gluon int4 decode GEMM for sm_90 without a GPU and pins its work
per 128-k chunk: two 16-byte weight loads per thread, the magic-number dequantization in registers (3 shifts and 4
``lop3`` per word, no int -> float conversion, no zero-point subtraction per weight), the 16-bit mma.sync for the
codes and for x's sums, and no spills.

Compiled in a subprocess without TRITON_INTERPRET (the test session interprets the kernels)."""

from __future__ import annotations

import pytest

from tests.benchmarks.offline_sass import needs_sass_tools, run_compile_script

COMPILE = """
import json
from benchmarks.gluon_int4_gemv_sass import compile_int4_gemv, summarize
print(json.dumps({f"{w}x{c}": summarize(compile_int4_gemv(w, c, n=4096, k=4096)) for w, c in ((4, 1), (8, 2))}))
"""


@needs_sass_tools
def test_int4_gemv_work_per_chunk():
    pytest.importorskip("triton.experimental.gluon")
    for name, info in run_compile_script(COMPILE).items():
        warps, chunks = map(int, name.split("x"))
        ops = info["loop"]
        chunks_per_warp = 4096 // 128 // warps  # the K loop is unrolled: the whole kernel's counts
        assert ops.get("LDG.E.EF.128", 0) == 2 * chunks_per_warp, (name, ops)  # rows g and g + 8, evict-first
        assert ops.get("HMMA.16816.F32.BF16", 0) == 16 * chunks_per_warp, (name, ops)  # codes and x's sums
        assert ops.get("SHF.R.U32.HI", 0) <= 24 * chunks_per_warp + 8, (name, ops)  # 3 per word
        assert not any(op.startswith(("I2F", "F2F.", "HADD2", "HFMA2", "LDL", "STL")) for op in ops), (name, ops)
        assert sum(n for op, n in ops.items() if op.startswith("F2FP")) <= 4, (name, ops)  # the output's rounding
        assert info["stack"] == 0, info
