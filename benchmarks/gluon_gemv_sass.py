"""What the compiler makes of the Gluon fp8 decode GEMM's loop (kernels/fp8_gemv_gluon.py), without a GPU.

    python benchmarks/gluon_gemv_sass.py [--warps 4] [--chunks 2] [--quant-x]

Compiles ``_gemv_kernel`` for sm_90 (Triton's bundled ptxas / cuobjdump) and prints its registers, stack, shared
memory and the opcodes of the K loop. The point of the kernel: per 128-byte chunk of a weight row pair, two 16-byte
global loads per thread straight into the mma fragments, packed e4m3 -> fp16 conversions in place
(``F2FP.F16.E4M3.UNPACK_B``) and the fp16 ``mma.sync`` (``HMMA.16816.F32``), with no byte shuffles and no shared
memory in the loop.
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
    sys.exit("gluon_gemv_sass.py compiles the kernel: run it without TRITON_INTERPRET=1")

from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from benchmarks.attention_sass import INSTRUCTION, _compile, sass_and_resources  # noqa: E402
from benchmarks.gluon_decode_sass import print_summary, summarize  # noqa: E402
from kernels import fp8_gemv_gluon  # noqa: E402
from kernels.fp8_quant import FP8_MAX, FP8_MIN_SCALE  # noqa: E402


def compile_gemv(warps: int = 4, chunks: int = 2, quant_x: bool = False, even_k: bool = True,
                 single_step: bool = False, use_pdl: bool = False, rope_cache: bool = False,
                 preload: int = 0, staged: int = 0, silu_mul: bool = False, quant_once: bool = False,
                 k: int = 0, norm: int = 0):  # fmt: skip
    """The kernel for sm_90 with the argument types and 16-divisibility the JIT would see on the GPU
    (``rope_cache``: the qkv GEMM with the attention prep in its epilogue, Llama-8B's 128-dim heads; ``preload``:
    steps of weight loaded before the PDL wait, with ``use_pdl``, as ``prologue_steps`` picks them; ``staged``: steps
    staged in shared memory there too; ``silu_mul``: the gate_up GEMM with the SiLU-and-mul epilogue; ``quant_once``:
    bf16 x quantized once into a scratch row after the wait, for a K of ``k``; ``norm``: 1 RMS-normed first, 2 with
    the residual add)."""
    w_tile, x_tile, mma = fp8_gemv_gluon.gemv_layouts(warps, chunks)
    config = fp8_gemv_gluon.GemvConfig(warps, chunks, quant_x, preload, staged, quant_once)
    preload, prefetch = fp8_gemv_gluon.prologue_steps(config, 2 * config.step, single_step, use_pdl)  # whole steps
    quant_once = quant_once or norm > 0
    pointers = {"x_ptr": "*bf16" if quant_x or quant_once else "*u8", "scratch_ptr": "*u8", "x_scale_ptr": "*fp32",
                "res_ptr": "*bf16", "res_out_ptr": "*bf16", "nw_ptr": "*bf16",
                "w_ptr": "*u8",
                "w_scale_ptr": "*fp32", "out_ptr": "*bf16", "positions_ptr": "*i64", "cos_sin_ptr": "*fp32",
                "slot_ptr": "*i64", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16"}
    return _compile(fp8_gemv_gluon._gemv_kernel, pointers, {"eps"},
                    {"task": None, "wait_ptr": None, "wait_target": 0, "WAIT_COUNTER": False,
                     "WARPS": warps, "CHUNKS": chunks, "W_TILE": w_tile, "X_TILE": x_tile, "MMA": mma,
                     "EVEN_K": even_k, "QUANT_X": quant_x, "SINGLE_STEP": single_step,
                     "PREFETCH_STEPS": prefetch, "PRELOAD": preload, "FP8_MAX": FP8_MAX,
                     "MIN_SCALE": FP8_MIN_SCALE, "ROPE_CACHE": rope_cache, "HEAD_DIM": 128, "BLOCK_SIZE": 16,
                     "USE_PDL": use_pdl, "STAGED": staged,
                     "STAGED_LAYOUT": fp8_gemv_gluon.staged_layout() if staged else None, "SILU_MUL": silu_mul,
                     "QUANT_ONCE": quant_once, "PIECES": -(-(k or 2 * config.step) // (256 * warps)),
                     "SLOTS": fp8_gemv_gluon.QUANT_ONCE_SLOTS, "NORM": norm}, warps, 1,
                    divisible_ints=frozenset({"K", "stride_cs", "stride_kcb", "stride_kcs", "stride_kch",
                                              "stride_vcb", "stride_vcs", "stride_vch", "Q_ROWS", "KV_ROWS"}),
                    source_cls=GluonASTSource)  # fmt: skip



def compile_mlp_half(config=None, hidden: int = 4096, q_size: int = 4096, inter: int = 14336, use_pdl: bool = True):
    """``kernels/fp8_mlp_gluon.py``'s one-launch MLP half for sm_90 (Llama-8B's shapes by default)."""
    from kernels import fp8_mlp_gluon

    config = config or fp8_mlp_gluon.MlpHalfConfig()
    constexprs = {**fp8_mlp_gluon.launch_constexprs(config, hidden, q_size, inter, use_pdl), "USE_PDL": use_pdl}
    pointers = {name: "*bf16" for name in ("a_ptr", "o_out_ptr", "res_ptr", "res_out_ptr", "nw_ptr", "h_ptr",
                                           "out_ptr")}
    pointers.update({name: "*u8" for name in ("o_w_ptr", "o_scratch_ptr", "xq_ptr", "g_w_ptr", "d_w_ptr",
                                              "d_scratch_ptr")})
    pointers.update({name: "*fp32" for name in ("o_s_ptr", "xs_ptr", "g_s_ptr", "d_s_ptr")})
    pointers["sync_ptr"] = "*i32"
    return _compile(fp8_mlp_gluon._mlp_half_kernel, pointers, {"eps"}, constexprs, config.o.warps, 1,
                    divisible_ints=frozenset({"HIDDEN", "Q_SIZE", "INTER"}), source_cls=GluonASTSource)

def loops(compiled) -> list[dict[str, int]]:
    """The opcode counts of every backward-branch region of the SASS, largest first (``summarize`` reports only the
    largest: with ``quant_once`` that is the rows' quantization, not the K loop)."""
    sass, _ = sass_and_resources(compiled.asm["cubin"])
    instrs = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in INSTRUCTION.finditer(sass)]
    found = []
    for addr, op, args in instrs:
        target = re.match(r"\s*0x([0-9a-f]+)", args)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            found.append(collections.Counter(o for a, o, _ in instrs if lo <= a <= addr))
    return [dict(c) for c in sorted(found, key=lambda c: -sum(c.values()))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--quant-x", action="store_true", help="x in bf16, quantized in the kernel")
    parser.add_argument("--rope-cache", action="store_true", help="the qkv GEMM with the attention prep epilogue")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    parser.add_argument("--sass", action="store_true", help="print the whole SASS")
    opts = parser.parse_args()
    compiled = compile_gemv(opts.warps, opts.chunks, opts.quant_x, rope_cache=opts.rope_cache)
    if opts.sass:
        print(sass_and_resources(compiled.asm["cubin"])[0])
    info = summarize(compiled)
    print_summary(info, f"Gluon fp8 GEMV, sm_90, {opts.warps} warps x {opts.chunks} chunks: {info['registers']} "
                        f"registers, {info['stack']} B stack, {info['shared']} B shared; K loop: "
                        f"{info['loop_total']} instructions per warp per {opts.chunks * 2} KB of weight", opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
