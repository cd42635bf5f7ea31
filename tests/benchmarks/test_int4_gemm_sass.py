"""benchmarks/int4_gemm_sass.py compiles the int4 decode GEMMs for sm_90 without a GPU (Triton's bundled ptxas /
cuobjdump) and checks what the tensor-core kernel is for: its loop dequantizes two weights per packed half2
instruction (no int -> float conversion: the magic-number trick), hands the tile to Hopper's wgmma (``HGMMA.64``,
the weight as the 64-row side, never mma.sync), and needs well under the CUDA-core fma kernel's instructions per
weight; the ``mms`` variant drops the per-weight scale multiply for one FMA per output element and tile.

Compiled in a subprocess without TRITON_INTERPRET (the test session interprets the kernels)."""

from __future__ import annotations

from tests.benchmarks.offline_sass import needs_sass_tools, run_compile_script

COMPILE = """
import json
from benchmarks.int4_gemm_sass import compile_fma, compile_mma
from benchmarks.fp8_gemm_sass import loop_summary
from kernels.skinny_gemm import SkinnyConfig
out = {}
for text, dtype, compile_fn in (("fma:8x1024:w4:p0", "bf16", compile_fma), ("fma:16x512:w4:p0", "bf16", compile_fma),
                                ("mma:64x128:w4:s4", "bf16", compile_mma), ("mma:128x128:w4:s3", "bf16", compile_mma),
                                ("mma:128x128:w4:s3", "fp16", compile_mma), ("mms:128x128:w4:s3", "bf16", compile_mma)):
    config = SkinnyConfig.parse(text)
    info = loop_summary(compile_fn(config, dtype), config)
    out[f"{text} {dtype}"] = {k: info[k] for k in ("loop", "loop_total", "mmas", "per_1000_weights", "stack")}
config = SkinnyConfig.parse("mma:64x128:w4:s4")  # a K-split launch: the in-kernel reduction after the loop
out["split"] = loop_summary(compile_mma(config, "bf16", split=True), config)["loop_total"]
print(json.dumps(out))
"""


@needs_sass_tools
def test_mma_loop_dequantizes_in_packed_half2_into_wgmma():
    result = run_compile_script(COMPILE)
    fma = min(result[f"{c} bf16"]["per_1000_weights"] for c in ("fma:8x1024:w4:p0", "fma:16x512:w4:p0"))
    assert all(result[f"{c} bf16"]["mmas"] == 0 for c in ("fma:8x1024:w4:p0", "fma:16x512:w4:p0"))
    for key in ("mma:64x128:w4:s4 bf16", "mma:128x128:w4:s3 bf16", "mma:128x128:w4:s3 fp16"):
        info = result[key]
        loop = info["loop"]
        block_n, block_k = (int(v) for v in key.split(":")[1].split("x"))
        weights_per_thread = block_n * block_k // 128  # 4 warps
        assert not any(op.startswith(("HMMA", "I2F", "F2F", "F2FP")) for op in loop), loop
        # bf16 / fp16 wgmma with M = 64 (HGMMA.64x16x16): one per 64 weight rows and 16 of K
        assert loop.get("HGMMA.64", 0) == info["mmas"] == block_n // 64 * block_k // 16, loop
        # the scale multiply: one packed instruction per two weights
        mul = "HMUL2.BF16_V2" if key.endswith("bf16") else "HMUL2"
        assert loop.get(mul, 0) == weights_per_thread // 2, loop
        assert loop.get("LOP3.LUT", 0) <= weights_per_thread // 2 + 2, loop  # lop3: two nibbles per instruction
        assert info["stack"] == 0
        # the weight streams through 16-byte async copies that skip L1 (cp.async.cg), not 8-byte ones
        assert loop.get("LDGSTS.E.BYPASS.128", 0) > 0 and "LDGSTS.E.64" not in loop, loop
        assert info["per_1000_weights"] < 0.6 * fma, (key, info["per_1000_weights"], fma)
    # the split launch's epilogue (partials, arrival counter, the last program's sum) leaves the K loop as it was
    assert result["split"] <= result["mma:64x128:w4:s4 bf16"]["loop_total"] + 2, result["split"]
    # mms: q - z into the MMA (no per-weight multiply), one FFMA per accumulator element and tile for the scale
    mms, mma = result["mms:128x128:w4:s3 bf16"], result["mma:128x128:w4:s3 bf16"]
    assert "HMUL2.BF16_V2" not in mms["loop"] and mms["loop"].get("FFMA", 0) == 128 * 16 // 128
    assert mms["loop"].get("HGMMA.64", 0) == 16 and mms["stack"] == 0
    assert mms["per_1000_weights"] < 0.95 * mma["per_1000_weights"]


TILED_COMPILE = """
import json
from benchmarks.int4_gemm_sass import compile_fma, compile_mma
from benchmarks.fp8_gemm_sass import loop_summary
from kernels.skinny_gemm import SkinnyConfig
out = {}
for text, compile_fn in (("fma:16x256:w4:p0", compile_fma), ("fma:8x64:w2:p0", compile_fma),
                         ("mma:128x256:w4:s3", compile_mma), ("mms:128x128:w8:s3", compile_mma),
                         ("mma:64x64:w4:s3", compile_mma)):
    config = SkinnyConfig.parse(text)
    out[text] = [loop_summary(compile_fn(config, "bf16", tiled=tiled), config) for tiled in (False, True)]
    out[text] = [{k: info[k] for k in ("loop", "loop_total")} for info in out[text]]
print(json.dumps(out))
"""


@needs_sass_tools
def test_the_tiled_layout_keeps_every_kernels_16_byte_loads():
    """``tile_int4``'s offsets are written so the compiler still sees each 128-k run contiguous and aligned: the
    fma and tensor-core loops load the tiled weight with the plain layout's 16-byte loads (their first version lost
    them and ran 2.3-2.9x slower on the H200) and a handful of address instructions more at most."""
    result = run_compile_script(TILED_COMPILE)
    for text, (plain, tiled) in result.items():
        loads = {op: n for op, n in plain["loop"].items() if op.startswith(("LDG", "LDGSTS"))}
        assert loads and {op: tiled["loop"].get(op, 0) for op in loads} == loads, (text, plain["loop"], tiled["loop"])
        assert not any(op.startswith(("LDG", "LDGSTS")) and op not in loads for op in tiled["loop"]), (text, tiled)
        assert tiled["loop_total"] <= plain["loop_total"] + 8, (text, plain["loop_total"], tiled["loop_total"])
