"""The byte-codes decode GEMV (kernels/codes_gemv.py) compiles for sm_90 (Triton's bundled ptxas) at one row's default
launch (8 rows; 256-byte steps on 1 warp, GPTQ 8-bit's 128 on 2), one or two steps in flight, without spills and
without layout conversions of the tile in its K loop (the first try at reading the weight as int32 words joined back
into bytes put 12 stores, 9 loads and 6 barriers in each step; under Triton 3.6 a gather load of the codebook and
the scales at the tile's shape put 32 stores and 32 loads a step). 4-bit codes through the codebook (NF4's fp32
absmax per 64, NVFP4's fp8 scales per 16 with a row scale), 8-bit codes per row and in groups with zero points."""

from __future__ import annotations

import pytest

from tests.benchmarks.offline_sass import needs_sass_tools, run_compile_script

COMPILE = """
import json
from benchmarks.attention_sass import _compile, summarize
from kernels import codes_gemv
out = {}
cases = {"nf4": (True, 64, "*fp32", "*u8", False, False), "nvfp4": (True, 16, "*fp8e4nv", "*u8", False, True),
         "int8": (False, 0, "*fp32", "*i8", False, False), "gptq8": (False, 128, "*fp32", "*u8", True, False)}
for name, (four_bit, group, scale, codes, zeros, row_scales) in cases.items():
    step = codes_gemv.default_config(2048 if four_bit else 4096, four_bit, group, 1)  # one row's default
    for ahead in (1, 2):
        pointers = {"x_ptr": "*bf16", "w_ptr": codes, "s_ptr": scale, "z_ptr": "*fp32", "codebook_ptr": "*fp32",
                    "row_scale_ptr": "*fp32", "out_ptr": "*bf16"}
        constexprs = dict(FOUR_BIT=four_bit, GROUP=group, ZEROS=zeros, ROW_SCALES=row_scales, X_PAIRS=four_bit,
                          BLOCK_M=1, BLOCK_N=step.block_n, BLOCK_B=step.block_b, AHEAD=ahead)
        info = summarize(_compile(codes_gemv._codes_gemv_kernel, pointers, set(), constexprs, step.num_warps, 1,
                                  divisible_ints=frozenset({"K"})))
        loop = info["loop_ops"]
        narrow = sum(n for op, n in info["loop_detail"].items()  # 4-byte or narrower global loads: gathers
                     if op.startswith("LDG.E") and not op.endswith((".64", ".128")))
        out[f"{name}_a{ahead}"] = [info["regs"], info["sass_ops"].get("STL", 0), info["loop_total"],
                                   loop.get("STS", 0) + loop.get("LDS", 0) + loop.get("BAR", 0), narrow]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    return run_compile_script(COMPILE)


@needs_sass_tools
def test_codes_gemv_compiles_without_spills_or_shared_memory_in_its_loop(compiled):
    """No spills; 8-bit codes no shared memory in the loop, 4-bit ones only the step's block scales moved into the
    tile's layout (at most 4 stores, 2 loads and a barrier, on one warp)."""
    assert len(compiled) == 8
    for name, (regs, spills, loop, shared, _) in compiled.items():
        assert 0 < regs <= 255 and loop > 0 and spills == 0, (name, compiled)
        assert shared <= (7 if name.startswith(("nf4", "nvfp4")) else 0), (name, compiled)


@needs_sass_tools
def test_codes_gemv_looks_codes_up_without_global_loads(compiled):
    """The 16-entry codebook is held by the program and read with ``tl.gather`` (warp shuffles), not loaded from
    ``codebook + code`` a code: under Triton 3.6 (the GPU's) that load's own layout made each step convert the
    tile through shared memory (NF4 1,360 instructions a step against 829; NVFP4 25 spills). One step of 256 bytes
    on a row is 512 codes over 32 threads: the loop keeps only the scale loads as narrow loads, and stays within
    900 instructions (Triton 3.9: NF4 819, NVFP4 845; 1,046 / 1,090 with the loads)."""
    for name in ("nf4_a1", "nvfp4_a1"):
        regs, spills, loop, shared, narrow = compiled[name]
        assert narrow <= 8 and loop <= 900, (name, compiled[name])
