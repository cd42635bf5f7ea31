"""benchmarks/attention_sass.py compiles the decode kernel for sm_90 on a machine without a GPU (Triton's bundled
ptxas / cuobjdump), and the fp8 read path it documents stays what kernels/NOTES.md says: with fp16 dots and V read as
pairs, the key-tile loop converts e4m3 with the packed instruction only (no per-element bf16 conversions), transposes
V with ldmatrix instead of byte loads, and runs fewer instructions in fewer registers than the first fp8 path.

Compiled in a subprocess without TRITON_INTERPRET (the test session interprets the kernels)."""

from __future__ import annotations

from tests.benchmarks.offline_sass import needs_sass_tools, run_compile_script

COMPILE = """
import json
from benchmarks.attention_sass import compile_decode, summarize
out = {}
for name, args in (("first", ("fp8e4nv", "bf16", False)), ("pairs", ("fp8e4nv", "fp16", True))):
    info = summarize(compile_decode(*args, 64, 4, 2))
    out[name] = {"loop": dict(info["loop_detail"]), "total": info["loop_total"], "regs": info["regs"]}
print(json.dumps(out))
"""


@needs_sass_tools
def test_fp8_pairs_loop_has_no_byte_loads_and_fewer_instructions():
    result = run_compile_script(COMPILE)
    first, pairs = result["first"], result["pairs"]
    assert first["loop"].get("F2F.BF16.F16", 0) > 0  # the first path: e4m3 -> f16 -> bf16, one value at a time
    assert first["loop"].get("LDS.U8", 0) > 0  # and V transposed byte by byte
    assert pairs["loop"].get("F2F.BF16.F16", 0) == 0
    assert pairs["loop"].get("LDS.U8", 0) == 0
    assert pairs["loop"].get("LDSM.16.MT88.4", 0) > 0  # V transposed as 16-bit data by ldmatrix
    assert pairs["loop"].get("F2FP.F16.E4M3.UNPACK_B", 0) > 0  # cvt.rn.f16x2.e4m3x2: two values per instruction
    assert pairs["total"] < 0.7 * first["total"]
    assert pairs["regs"] < first["regs"]


SPLIT = """
import json
from benchmarks.attention_sass import compile_decode, programs_per_sm, summarize
out = {}
for name, kwargs in (("whole", {}), ("halves", {"split_v": True, "max_registers": 128})):
    info = summarize(compile_decode("fp8e4nv", "fp16", True, 128, 4, 2, **kwargs))
    out[name] = {"smem": info["smem"], "regs": info["regs"], "programs": programs_per_sm(info["regs"], info["smem"], 4)}
print(json.dumps(out))
"""


@needs_sass_tools
def test_split_v_fits_four_programs_per_sm():
    """``"f16-vsplit"`` at 128 keys / 4 warps / 2 stages with 128 registers: the fp16 V staging tile is half the
    size, so shared memory no longer caps an SM at 3 programs (kernels/NOTES.md)."""
    result = run_compile_script(SPLIT)
    assert result["whole"]["programs"] == 3
    assert result["halves"]["regs"] <= 128
    assert result["halves"]["smem"] < 0.8 * result["whole"]["smem"]
    assert result["halves"]["programs"] == 4
