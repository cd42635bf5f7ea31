"""What the compiler makes of the Gluon int4 decode GEMM's loop (kernels/int4_gemv_gluon.py), without a GPU.

    python benchmarks/gluon_int4_gemv_sass.py [--warps 4] [--chunks 2] [--fp16] [--preload 1]

Compiles ``_int4_gemv_kernel`` for sm_90 (Triton's bundled ptxas / cuobjdump) and prints its registers, stack,
shared memory and the opcodes of the K loop. The point of the kernel: per 128-k chunk of a weight row pair, two
16-byte global loads per thread straight into the mma fragments, the magic-number dequantization in place
(``SHF`` / ``LOP3`` / ``HFMA2``), x paired by byte permutes (``PRMT``) and the 16-bit ``mma.sync``
(``HMMA.16816.F32``), with no shared memory in the loop.
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
    sys.exit("gluon_int4_gemv_sass.py compiles the kernel: run it without TRITON_INTERPRET=1")

from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from benchmarks.attention_sass import INSTRUCTION, _compile, sass_and_resources  # noqa: E402
from benchmarks.gluon_decode_sass import print_summary  # noqa: E402
from kernels import int4_gemv_gluon  # noqa: E402


def compile_int4_gemv(warps: int = 4, chunks: int = 2, fp16: bool = False, n: int = 28672, k: int = 4096,
                      use_pdl: bool = False, preload: int = 0, group_size: int = 128,
                      rope_cache: bool = False, tiled: bool = False):  # fmt: skip
    """The kernel for sm_90 with the argument types and 16-divisibility the JIT would see on the GPU, for an ``n x
    k`` weight (default: Llama-8B's gate_up; ``preload``: steps of weight loaded before the PDL wait, with
    ``use_pdl``)."""
    w_tile, x_tile, mma = int4_gemv_gluon.gemv_layouts(warps, chunks)
    dtype = "*fp16" if fp16 else "*bf16"
    pointers = {"x_ptr": dtype, "qh_ptr": "*i16", "s_ptr": dtype, "z_ptr": dtype, "out_ptr": dtype,
                "positions_ptr": "*i64", "cos_sin_ptr": "*fp32", "slot_ptr": "*i64", "k_cache_ptr": dtype,
                "v_cache_ptr": dtype}
    return _compile(int4_gemv_gluon._int4_gemv_kernel, pointers, set(),
                    {"WARPS": warps, "CHUNKS": chunks, "W_TILE": w_tile, "X_TILE": x_tile, "MMA": mma,
                     "GROUP_SIZE": group_size, "MAGIC": 1024.0 if fp16 else 128.0, "N": n, "K": k,
                     "stride_qn": k // 4,
                     "PRELOAD": preload if use_pdl else 0, "USE_PDL": use_pdl, "ROPE_CACHE": rope_cache,
                     "HEAD_DIM": 128, "BLOCK_SIZE": 16, "TILED": tiled}, warps, 1,
                    divisible_ints=frozenset({"stride_cs", "stride_kcb", "stride_kcs", "stride_kch", "stride_vcb",
                                              "stride_vcs", "stride_vch", "Q_ROWS", "KV_ROWS"}),
                    source_cls=GluonASTSource)  # fmt: skip


def summarize(compiled) -> dict:
    """Registers, stack and shared memory, and the whole kernel's opcodes (the K loop is unrolled)."""
    sass, resources = sass_and_resources(compiled.asm["cubin"])
    ops = collections.Counter(m.group(2) for m in INSTRUCTION.finditer(sass))
    usage = dict(re.findall(r"(REG|SHARED|STACK):(\d+)", resources))
    return {"registers": int(usage.get("REG", 0)), "stack": int(usage.get("STACK", 0)),
            "shared": int(usage.get("SHARED", 0)), "total": sum(ops.values()), "loop": dict(ops)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--fp16", action="store_true", help="fp16 activations (default bf16)")
    parser.add_argument("--n", type=int, default=28672)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--preload", type=int, default=0, help="steps loaded before the PDL wait (PDL on)")
    parser.add_argument("--tiled", action="store_true", help="the weight in int4_gemm.tile_int4's order")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    parser.add_argument("--sass", action="store_true", help="print the whole SASS")
    opts = parser.parse_args()
    compiled = compile_int4_gemv(opts.warps, opts.chunks, opts.fp16, opts.n, opts.k, use_pdl=opts.preload > 0,
                                 preload=opts.preload, tiled=opts.tiled)
    if opts.sass:
        print(sass_and_resources(compiled.asm["cubin"])[0])
    info = summarize(compiled)
    print_summary(info, f"Gluon int4 GEMV, sm_90, {opts.warps} warps x {opts.chunks} chunks: {info['registers']} "
                        f"registers, {info['stack']} B stack, {info['shared']} B shared; {opts.n} x "
                        f"{opts.k}, whole kernel (the K loop unrolled): {info['total']} instructions per warp, "
                        f"{info['total'] / (16 * opts.k / opts.warps / 2 / 1024):.0f} per KB of weight", opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
