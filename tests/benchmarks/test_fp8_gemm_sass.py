"""benchmarks/fp8_gemm_sass.py compiles the fp8 decode GEMMs for sm_90 without a GPU (Triton's bundled ptxas /
cuobjdump) and shows why the W8A8 kernel exists: the w8a16 fma kernel's loop widens every weight (e4m3x2 -> f16x2
unpacks, f16 -> f32 adds, byte permutes) before its FMAs, while the ``mma`` kernel's loop hands both fp8 tiles to
Hopper's fp8 wgmma (``QGMMA``) with no conversion at all, in a fraction of the instructions per weight (``mmq``, which
quantizes the activation tile in the loop, converts only x).

Compiled in a subprocess without TRITON_INTERPRET (the test session interprets the kernels)."""

from __future__ import annotations

from tests.benchmarks.offline_sass import needs_sass_tools, run_compile_script

COMPILE = """
import json
from benchmarks.fp8_gemm_sass import compile_fma, compile_mma, loop_summary
from kernels.skinny_gemm import SkinnyConfig
out = {}
for text, compile_fn in (("fma:2x1024:w4:p0", compile_fma), ("mma:64x256:w4:s3", compile_mma),
                         ("mma:128x256:w4:s3", compile_mma), ("mmq:128x256:w4:s3", compile_mma)):
    config = SkinnyConfig.parse(text)
    info = loop_summary(compile_fn(config), config)
    out[text] = {k: info[k] for k in ("loop", "loop_total", "conversions", "mmas", "per_1000_weights")}
config = SkinnyConfig.parse("mma:128x256:w4:s3")  # a K-split launch: the in-kernel reduction after the loop
out["split"] = loop_summary(compile_mma(config, split=True), config)["loop_total"]
print(json.dumps(out))
"""


@needs_sass_tools
def test_mma_loop_feeds_fp8_to_wgmma_without_converting_the_weight():
    result = run_compile_script(COMPILE)
    fma = result["fma:2x1024:w4:p0"]
    assert fma["loop"].get("F2FP.F16.E4M3.UNPACK_B", 0) > 0 and fma["loop"].get("HADD2.F32", 0) > 0
    assert fma["mmas"] == 0 and fma["conversions"] > 0
    for text in ("mma:64x256:w4:s3", "mma:128x256:w4:s3"):
        mma = result[text]
        config_n, config_k = (int(v) for v in text.split(":")[1].split("x"))
        assert mma["conversions"] == 0, mma["loop"]  # no F2F / F2FP / I2F / HADD2 / PRMT in the loop
        assert not any(op.startswith(("HMMA", "F2F", "I2F")) for op in mma["loop"]), mma["loop"]
        # fp8 wgmma with M = 64 (the SASS is QGMMA.64x16x32.F32.E4M3.E4M3; the opcode regex stops at the "x"): one
        # per 64 weight rows and 32 bytes of K
        assert mma["loop"].get("QGMMA.64", 0) == mma["mmas"]
        assert mma["mmas"] == config_n // 64 * config_k // 32
        assert mma["per_1000_weights"] < 0.25 * fma["per_1000_weights"]
    # the split launch's epilogue (partials, arrival counter, the last program's sum) leaves the K loop as it was
    assert result["split"] <= result["mma:128x256:w4:s3"]["loop_total"] + 2, result["split"]
    # mmq quantizes the activation tile in the loop (fp32 -> e4m3 packs: conversions, but of x, not of the weight)
    mmq = result["mmq:128x256:w4:s3"]
    assert mmq["loop"].get("F2FP.F16.E4M3.UNPACK_B", 0) == 0 and mmq["loop"].get("HADD2.F32", 0) == 0
    assert not any(op.startswith("HMMA") for op in mmq["loop"]), mmq["loop"]
    assert mmq["loop"].get("F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C", 0) > 0
    assert mmq["loop"].get("QGMMA.64", 0) == mmq["mmas"] == 128 // 64 * 256 // 32
    assert mmq["per_1000_weights"] < 0.5 * fma["per_1000_weights"]


STREAM_K = """
import json
from benchmarks.fp8_gemm_sass import compile_stream_k, loop_summary
from kernels.skinny_gemm import SkinnyConfig
out = {}
for text, quant_x in (("msk:64x256:w4:s4", False), ("msk:128x256:w4:s3", False), ("msk:64x256:w4:s4", True)):
    config = SkinnyConfig.parse(text)
    info = loop_summary(compile_stream_k(config, quant_x), config)
    out[f"{text} quant_x={quant_x}"] = {k: info[k] for k in ("loop", "mmas", "async_copies", "stack")}
print(json.dumps(out))
"""


@needs_sass_tools
def test_stream_k_loop_stays_software_pipelined():
    """The stream-K loop ends column blocks inside it (plain stores only) and arrives at shared blocks after it: an
    atomic or a barrier of the split reduction inside the loop made Triton give up its cp.async pipeline."""
    result = run_compile_script(STREAM_K)
    for label, info in result.items():
        assert info["async_copies"] > 0, label  # the weight and x tiles go through cp.async stages
        assert info["loop"].get("LDGSTS.E.BYPASS.128", 0) > 0, (label, info["loop"])
        assert info["mmas"] > 0 and not any(op.startswith("HMMA") for op in info["loop"]), (label, info["loop"])
        assert not any(op.startswith(("ATOM", "RED")) for op in info["loop"]), (label, info["loop"])
        assert info["stack"] == 0, label


PRELOAD = """
import json
from benchmarks.fp8_gemm_sass import compile_fma, loop_summary
from kernels.fp8_linear import FP8_SKINNY_CONFIGS
config = FP8_SKINNY_CONFIGS[(1, 4096, 4096)]  # Llama-8B's o_proj
kernel = compile_fma(config, k=4096)
ptx = kernel.asm["ptx"].splitlines()
wait = next(i for i, line in enumerate(ptx) if "griddepcontrol.wait" in line)
info = loop_summary(kernel, config)
print(json.dumps({"preload": config.preload, "block_n": config.block_n, "block_k": config.block_k,
                  "warps": config.num_warps, "regs": info["regs"], "stack": info["stack"],
                  "loads_before_wait": sum("ld.global" in line for line in ptx[:wait])}))
"""


@needs_sass_tools
def test_o_proj_fma_loads_its_whole_weight_before_the_pdl_wait():
    """o_proj's ``fma`` config (``:r8``): every tile's 16-byte weight loads go out before ``griddepcontrol.wait``
    (4096 / 512 tiles x 16 rows x 512 bytes over the program's threads), in at most 128 registers (two programs an
    SM, so all 256 programs are resident at once) and without spills. (The channel scales are read there too.)"""
    result = run_compile_script(PRELOAD)
    weight_loads = result["preload"] * result["block_n"] * result["block_k"] // 16 // (32 * result["warps"])
    assert result["preload"] == 4096 // result["block_k"]
    assert weight_loads <= result["loads_before_wait"] <= weight_loads + 2, result
    assert result["regs"] <= 128 and result["stack"] == 0, result
