"""What the compiler makes of the fp8 decode GEMM loops, without a GPU: the w8a16 CUDA-core ``_fp8_fma_kernel``
(weight bytes widened to fp32 in registers, then FMAs) against the W8A8 ``_fp8_mma_kernel`` (fp8 x fp8 straight
into the tensor cores).

    python benchmarks/fp8_gemm_sass.py                         # Llama-3.1-8B qkv launch configs, sm_90
    python benchmarks/fp8_gemm_sass.py --mma mma:64x256:w4:s3,mma:128x128:w4:s4 --verbose --dump /tmp/sass

Compiles each kernel for sm_90 with ``triton.compile`` (``benchmarks/attention_sass.py``'s way: Triton's bundled
ptxas / cuobjdump, pointer, stride and K arguments carrying the divisibility-16 attribute the JIT gives them at these
shapes) and prints per kernel the SASS instructions in its main loop (the largest backward-branch region), the
conversion and MMA opcodes among them, and the loop's warp instructions per 1,000 weight bytes (loop instructions x
warps / weights per iteration): the cost the CUDA-core kernel pays per weight that makes it instruction-bound.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("fp8_gemm_sass.py compiles the kernels: run it without TRITON_INTERPRET=1")

from benchmarks.attention_sass import _compile as compile_sm90, loop_body, sass_and_resources  # noqa: E402
from kernels import fp8_linear, fp8_stream_k  # noqa: E402
from kernels.skinny_gemm import SkinnyConfig  # noqa: E402

# Opcodes that widen or re-pack the weight (the fma kernel's per-weight cost) and the tensor-core ones.
CONVERSION_PREFIXES = ("F2F", "F2FP", "I2F", "HADD2", "HMUL2", "HFMA2", "PRMT")
MMA_PREFIXES = ("QMMA", "HMMA", "QGMMA", "HGMMA", "GMMA", "IMMA")
DIVISIBLE_INTS = {"K", "k_per_split"}  # 4096 / 14336 and multiples of block_k: the JIT marks them divisible by 16


def _compile(kernel, pointers: dict[str, str], constexprs: dict, num_warps: int, num_stages: int):
    return compile_sm90(kernel, pointers, set(), constexprs, num_warps, num_stages, divisible_ints=DIVISIBLE_INTS)


def compile_fma(config: SkinnyConfig, block_m: int = 1, k: int = 4096):
    """``_fp8_fma_kernel`` as ``fp8_fma_gemm`` launches it on the GPU (bf16 activations, PTX fp8 widening; with PDL
    where the config preloads more than one tile of a ``k``-wide weight)."""
    pointers = {"x_ptr": "*bf16", "w_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": "*bf16"}
    preload = fp8_linear.fma_preload(config, k)
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, PREFETCH=config.prefetch,
                      PF_COLS=max(1, config.block_k // 128), EVEN_K=True, USE_PTX=True, USE_PDL=preload > 1,
                      PRELOAD=preload)  # fmt: skip
    return _compile(fp8_linear._fp8_fma_kernel, pointers, constexprs, config.num_warps, 1)


def compile_mma(config: SkinnyConfig, split: bool = False):
    """``_fp8_mma_kernel`` as ``fp8_mma_gemm`` launches it (16 padded token rows, bf16 out): an ``mma`` config
    reads e4m3 activations, an ``mmq`` one quantizes bf16 activations in the kernel."""
    pointers = {"x_ptr": "*u8", "x_scale_ptr": "*fp32", "w_ptr": "*u8", "w_scale_ptr": "*fp32", "out_ptr": "*bf16",
                "partial_ptr": "*fp32", "counter_ptr": "*i32"}
    quant_x = config.kind == "mmq"  # x: bf16 activations quantized in the kernel, else e4m3 bits
    if quant_x:
        pointers["x_ptr"] = "*bf16"
    constexprs = dict(BLOCK_M=16, BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=True, QUANT_X=quant_x,
                      STATIC=False, FP8_MAX=fp8_linear.FP8_MAX, MIN_SCALE=fp8_linear.FP8_MIN_SCALE,
                      SPLIT=split)  # fmt: skip
    return _compile(fp8_linear._fp8_mma_kernel, pointers, constexprs, config.num_warps, config.num_stages)


def compile_stream_k(config: SkinnyConfig, quant_x: bool = False):
    """``kernels/fp8_stream_k.py: _fp8_stream_k_kernel`` as an ``msk`` config launches it (bf16 out; ``quant_x``:
    bf16 activations quantized in the kernel, else e4m3 bits)."""
    pointers = {"x_ptr": "*bf16" if quant_x else "*u8", "x_scale_ptr": "*fp32", "w_ptr": "*u8", "w_scale_ptr": "*fp32",
                "out_ptr": "*bf16", "partial_ptr": "*fp32", "counter_ptr": "*i32"}
    constexprs = dict(BLOCK_M=16, BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=True, EVEN_N=True,
                      NUM_STAGES=config.num_stages, QUANT_X=quant_x, FP8_MAX=fp8_linear.FP8_MAX,
                      MIN_SCALE=fp8_linear.FP8_MIN_SCALE, USE_PDL=False)  # fmt: skip
    return _compile(fp8_stream_k._fp8_stream_k_kernel, pointers, constexprs, config.num_warps, config.num_stages)


def loop_summary(kernel, config: SkinnyConfig) -> dict:
    """The main loop's opcodes (with modifiers), its size, conversions, MMAs and warp instructions per 1000 weights."""
    sass, res = sass_and_resources(kernel.asm["cubin"])
    loop = loop_body(sass)
    detail = collections.Counter(op for _, op, _ in loop)
    base = collections.Counter(op.split(".")[0] for _, op, _ in loop)
    conversions = sum(v for k, v in base.items() if k in CONVERSION_PREFIXES)
    mmas = sum(v for k, v in base.items() if k in MMA_PREFIXES)
    weights = config.block_n * config.block_k
    return {"loop": dict(detail), "loop_total": len(loop), "conversions": conversions, "mmas": mmas,
            "per_1000_weights": len(loop) * config.num_warps * 1000 / weights, "sass": sass,
            "ptx": kernel.asm["ptx"], "regs": _resource(res, "REG"), "stack": _resource(res, "STACK"),
            "smem": kernel.metadata.shared, "async_copies": kernel.asm["ttgir"].count("async_copy_global_to_local")}


def _resource(usage: str, name: str) -> int:
    match = re.search(rf"{name}:(\d+)", usage)
    return int(match.group(1)) if match else -1


def print_loop_and_dump(info: dict, verbose: bool, dump: str | None, stem: str) -> None:
    """``--verbose``: the loop's opcode counts; ``--dump DIR``: the kernel's PTX and SASS as DIR/stem.{ptx,sass}."""
    if verbose:
        print("    loop: " + ", ".join(f"{k} {v}" for k, v in sorted(info["loop"].items())))
    if dump:
        base = Path(dump) / stem
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".ptx").write_text(info["ptx"])
        base.with_suffix(".sass").write_text(info["sass"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fma", default="fma:2x1024:w4:p0,fma:16x512:w8:p0:r8,fma:4x512:w4:p0",
                        help="comma-separated fma configs (today's FP8_SKINNY_CONFIGS entries)")
    parser.add_argument("--mma", default="mma:64x256:w4:s3,mma:128x256:w4:s3,mma:64x512:w4:s2,mmq:64x256:w4:s3,mmq:128x256:w4:s3",
                        help="comma-separated mma / mmq configs")
    parser.add_argument("--msk", default="msk:64x256:w4:s4,msk:128x256:w4:s3", help="comma-separated msk configs")
    parser.add_argument("--verbose", action="store_true", help="every opcode of the loop with its modifiers")
    parser.add_argument("--dump", default="", help="write each kernel's PTX and SASS into this folder")
    opts = parser.parse_args()
    print("kernel config | loop SASS instr | warp instr / 1000 weights | conversions | MMAs | regs | stack bytes | smem bytes")
    jobs = [("fma", c, compile_fma) for c in opts.fma.split(",") if c] + \
        [(c[:3], c, compile_mma) for c in opts.mma.split(",") if c] + \
        [("msk", c, compile_stream_k) for c in opts.msk.split(",") if c]  # fmt: skip
    for kind, text, compile_fn in jobs:
        config = SkinnyConfig.parse(text)
        info = loop_summary(compile_fn(config), config)
        print(f"{text} | {info['loop_total']} | {info['per_1000_weights']:.1f} | {info['conversions']} | "
              f"{info['mmas']} | {info['regs']} | {info['stack']} | {info['smem']}")  # fmt: skip
        print_loop_and_dump(info, opts.verbose, opts.dump, text.replace(":", "_"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
