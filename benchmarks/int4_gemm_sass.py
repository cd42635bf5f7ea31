"""What the compiler makes of the int4 (w4a16) decode GEMM loops, without a GPU: the CUDA-core ``_int4_fma_kernel``
(nibbles or'ed into 1.0's mantissa, one FMA to dequantize and one per x row, all fp32) against the tensor-core
``_int4_mma_kernel`` (magic-number dequantization two weights per 32-bit instruction, then wgmma; ``mms`` configs
scale each tile's product instead of each weight).

    python benchmarks/int4_gemm_sass.py                        # today's fma configs and mma candidates, sm_90, bf16
    python benchmarks/int4_gemm_sass.py --mma mma:128x256:w8:s3 --dtype fp16 --verbose --dump /tmp/sass

Compiles each kernel for sm_90 the way ``benchmarks/fp8_gemm_sass.py`` does (``benchmarks/attention_sass._compile``:
Triton's bundled ptxas / cuobjdump, pointers, strides and K carrying the JIT's divisibility-16 attribute) and prints
per kernel the SASS instructions of its main loop (the largest backward-branch region), its MMAs, and the loop's warp
instructions per 1,000 weights (loop instructions x warps / weights per iteration), group 128.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("int4_gemm_sass.py compiles the kernels: run it without TRITON_INTERPRET=1")

from benchmarks.attention_sass import _compile as compile_sm90  # noqa: E402
from benchmarks.fp8_gemm_sass import loop_summary, print_loop_and_dump  # noqa: E402
from kernels import int4_gemm  # noqa: E402
from kernels.skinny_gemm import SkinnyConfig  # noqa: E402

GROUP = 128
MAGIC = {"bf16": 128.0, "fp16": 1024.0}


def compile_fma(config: SkinnyConfig, dtype: str = "bf16", block_m: int = 1, tiled: bool = False):
    """``_int4_fma_kernel`` as ``int4_fma_gemm`` launches it (one x row per program at M = 1; ``tiled``: on
    ``tile_int4``'s layout)."""
    pointers = {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "s_ptr": f"*{dtype}", "z_ptr": f"*{dtype}",
                "out_ptr": f"*{dtype}"}  # fmt: skip
    constexprs = dict(GROUP_SIZE=GROUP, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                      TILED=tiled)
    return compile_sm90(int4_gemm._int4_fma_kernel, pointers, set(), constexprs, config.num_warps, 1,
                        divisible_ints={"K"})  # fmt: skip


def compile_mma(config: SkinnyConfig, dtype: str = "bf16", split: bool = False, tiled: bool = False):
    """``_int4_mma_kernel`` as ``int4_mma_gemm`` launches it on the GPU (16 padded token rows, PTX dequantization;
    an ``mms`` config scales the products instead of the weights; ``tiled``: on ``tile_int4``'s layout)."""
    pointers = {"x_ptr": f"*{dtype}", "qh_ptr": "*i16", "s_ptr": f"*{dtype}", "z_ptr": f"*{dtype}",
                "out_ptr": f"*{dtype}", "partial_ptr": "*fp32", "counter_ptr": "*i32"}  # fmt: skip
    constexprs = dict(GROUP_SIZE=GROUP, BLOCK_M=16, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                      MAGIC=MAGIC[dtype], SCALE_AFTER=config.kind == "mms", USE_ASM=True,
                      FRACTIONAL_ZEROS=False, SPLIT=split, TILED=tiled)  # fmt: skip
    return compile_sm90(int4_gemm._int4_mma_kernel, pointers, set(), constexprs, config.num_warps, config.num_stages,
                        divisible_ints={"K"})  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fma", default="fma:8x1024:w4:p0,fma:16x512:w4:p0", help="comma-separated fma configs")
    parser.add_argument("--mma", default="mma:64x128:w4:s4,mma:128x128:w4:s3,mma:64x256:w4:s3,mma:128x256:w8:s3,"
                        "mms:64x128:w4:s4,mms:128x128:w4:s3,mms:128x128:w8:s3",
                        help="comma-separated mma / mms configs")
    parser.add_argument("--dtype", default="bf16", choices=sorted(MAGIC), help="activation dtype")
    parser.add_argument("--tiled", action="store_true", help="the weight in tile_int4's layout")
    parser.add_argument("--verbose", action="store_true", help="every opcode of the loop with its modifiers")
    parser.add_argument("--dump", default="", help="write each kernel's PTX and SASS into this folder")
    opts = parser.parse_args()
    print("kernel config | loop SASS instr | warp instr / 1000 weights | MMAs | regs | stack bytes | smem bytes")
    jobs = [(c, compile_fma) for c in opts.fma.split(",") if c] + [(c, compile_mma) for c in opts.mma.split(",") if c]
    for text, compile_fn in jobs:
        config = SkinnyConfig.parse(text)
        info = loop_summary(compile_fn(config, opts.dtype, tiled=opts.tiled), config)
        print(f"{text} | {info['loop_total']} | {info['per_1000_weights']:.1f} | {info['mmas']} | {info['regs']} | "
              f"{info['stack']} | {info['smem']}")  # fmt: skip
        print_loop_and_dump(info, opts.verbose, opts.dump, f"int4_{opts.dtype}_{text.replace(':', '_')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
