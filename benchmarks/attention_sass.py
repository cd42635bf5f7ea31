"""What the compiler makes of the decode attention loop for an fp8 KV cache, without a GPU.

    python benchmarks/attention_sass.py                      # bf16 cache, fp8 via bf16 (old), fp8 via fp16 (new)
    python benchmarks/attention_sass.py --configs 64/4/2,128/8/3 --dump /tmp/sass
    python benchmarks/attention_sass.py --configs 64/4/2 --prefill 128/64/8/2,16/64/4/2   # the prefill kernel too
    python benchmarks/attention_sass.py --group 3 --queries 6    # a verify step's tile (SmolLM2-135M, k = 5: 18 rows)

Compiles ``_decode_kernel`` for sm_90 (``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, pointer
and stride arguments carrying the divisibility-16 attribute the JIT gives them) at W1's shape (head dim 128, 16 query /
8 KV heads: a query group of 2 padded to 16 rows) and prints, per variant, the conversion instructions in the PTX and
the SASS (``cvt``, ``F2FP``, ``F2F``, ``PRMT``...), the total SASS instruction count (the loop is not unrolled, so
this is close to one key tile's work plus the pipelining prologue) and the registers / shared memory from
``cuobjdump --dump-resource-usage``. Needs only Triton's bundled ptxas / cuobjdump.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("attention_sass.py compiles the kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from kernels import decode_attention, prefill_attention  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# Variants: (label, cache element type, dot element type, V as pairs, p @ v in two halves): the dots run in the dot
# type, q is cast to it once.
VARIANTS = [("bf16 cache", "bf16", "bf16", False, False),
            ("fp8 cache, bf16 dots (old)", "fp8e4nv", "bf16", False, False),
            ("fp8 cache, fp16 dots", "fp8e4nv", "fp16", False, False),
            ("fp8 cache, fp16 dots, V as pairs", "fp8e4nv", "fp16", True, False),
            ("fp8 cache, fp16 dots, V as pairs in two halves", "fp8e4nv", "fp16", True, True)]  # fmt: skip


def compile_decode(cache_ty: str, dot_ty: str, v_pairs: bool, tile_n: int, num_warps: int, num_stages: int, *, group: int = 2,
                   head_dim: int = 128, block_size: int = 16, queries: int = 1, split_v: bool = False,
                   max_registers: int | None = None, **overrides):  # fmt: skip
    """The compiled decode kernel for one variant (queries are bf16 in the engine; ``dot_ty`` is the type q and the
    K/V tiles are converted to before the dots). ``queries``: query rows per sequence (1 + k for a speculative
    verify step; the tile's rows are the queries x group (query, head) pairs). ``overrides``: other constexprs
    (``NUM_SPLITS``, ``USE_PDL``, ...)."""
    kernel = decode_attention._decode_kernel
    fp8 = cache_ty == "fp8e4nv"
    pointers = {"out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "counter_ptr": "*i32",
                "order_ptr": "*i32", "q_ptr": "*bf16", "k_cache_ptr": f"*{cache_ty}", "v_cache_ptr": f"*{cache_ty}",
                "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32", "slopes_ptr": "*bf16"}  # fmt: skip
    floats = {"qk_scale", "cap_log2", "v_scale"}
    rows_pad = triton.next_power_of_2(queries * group)
    constexprs = dict(GROUP=group, BLOCK_H=max(16, rows_pad), HEAD_DIM=head_dim,
                      BLOCK_D=head_dim, BLOCK_SIZE=block_size, TILE_N=tile_n, NUM_SPLITS=1, ORDER=2,
                      FUSED_REDUCE=False, GROUP_PAD=rows_pad, SPLITS_PAD=1, SPLIT_CHUNK=1, QUERIES=queries,
                      IEEE=False, SOFTCAP=False, ALIBI=False, WINDOW=False, KV_FP8=fp8,
                      FP8_F16_DOTS=fp8 and dot_ty == "fp16", V_PAIRS=v_pairs, PAIRS_ASM=v_pairs,
                      SPLIT_V=split_v)  # fmt: skip
    constexprs.update(overrides)
    return _compile(kernel, pointers, floats, constexprs, num_warps, num_stages, max_registers=max_registers)


def compile_prefill(cache_ty: str, dot_ty: str, v_pairs: bool, block_m: int, tile_n: int, num_warps: int,
                    num_stages: int, *, group: int = 2, head_dim: int = 128, block_size: int = 16,
                    split_v: bool = False):  # fmt: skip
    """The compiled prefill kernel for one variant (same variants as :func:`compile_decode`)."""
    kernel = prefill_attention._prefill_kernel
    fp8 = cache_ty == "fp8e4nv"
    pointers = {"out_ptr": "*bf16", "q_ptr": "*bf16", "k_cache_ptr": f"*{cache_ty}", "v_cache_ptr": f"*{cache_ty}",
                "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32", "slopes_ptr": "*bf16"}  # fmt: skip
    block_m = max(block_m, triton.next_power_of_2(group))
    constexprs = dict(GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_m // group, HEAD_DIM=head_dim, BLOCK_D=head_dim,
                      BLOCK_SIZE=block_size, TILE_N=tile_n, IEEE=False, SOFTCAP=False, ALIBI=False, WINDOW=False,
                      KV_FP8=fp8, FP8_F16_DOTS=fp8 and dot_ty == "fp16", V_PAIRS=v_pairs, PAIRS_ASM=v_pairs,
                      SPLIT_V=split_v)  # fmt: skip
    return _compile(kernel, pointers, {"qk_scale", "cap_log2", "v_scale"}, constexprs, num_warps, num_stages)


def _compile(kernel, pointers: dict[str, str], floats: set[str], constexprs: dict, num_warps: int, num_stages: int,
             divisible_ints: frozenset[str] = frozenset(), max_registers: int | None = None,
             source_cls=ASTSource):  # fmt: skip
    """The kernel compiled for sm_90 with the argument types and 16-divisibility the JIT would see on the GPU:
    pointers, the strides (but the block table's) and ``divisible_ints`` marked divisible by 16; ``max_registers``
    is Triton's ``maxnreg``; ``source_cls``: ``GluonASTSource`` for a Gluon kernel."""
    signature, attrs = {}, {}
    # constexprs with defaults the caller left out (a bare ASTSource does not apply them): PDL off, as launched
    # without programmatic dependent launch, and what is done before its wait at the defaults (PF_COLS, PRELOAD,
    # PRE_WAIT_KV, EARLY_RELEASE), and the int4 kernels on the plain layout (TILED)
    defaults = (("USE_PDL", False), ("PF_COLS", 1), ("PRELOAD", 1), ("PRE_WAIT_KV", False), ("EARLY_RELEASE", False),
                ("TILED", False))
    constexprs = {**{name: value for name, value in defaults if name in kernel.arg_names}, **constexprs}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if (name.startswith("stride_") and name not in ("stride_bt",)) or name in divisible_ints:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = source_cls(kernel, signature, constexprs, attrs)
    backend = make_backend(TARGET)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages,
                                     **({"maxnreg": max_registers} if max_registers else {})})
    return triton.compile(src, target=TARGET, options=options.__dict__)


def sass_and_resources(cubin: bytes) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
        res = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                             text=True).stdout  # fmt: skip
    return sass, res


INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loop_body(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of the largest backward-branch region: the key-tile loop."""
    instrs = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in INSTRUCTION.finditer(sass)]
    best: tuple[int, int] | None = None
    for addr, op, args in instrs:
        target = re.match(r"\s*0x([0-9a-f]+)", args)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            if best is None or addr - lo > best[1] - best[0]:
                best = (lo, addr)
    if best is None:
        return []
    return [i for i in instrs if best[0] <= i[0] <= best[1]]


def summarize(kernel) -> dict:
    """Conversion counts (PTX and SASS), SASS instruction count, registers and shared memory."""
    ptx = kernel.asm["ptx"]
    cvt = collections.Counter(m.group(1) for m in re.finditer(r"\b(cvt(?:\.[a-z0-9x]+)+)", ptx))
    sass, res = sass_and_resources(kernel.asm["cubin"])
    ops = collections.Counter(m.group(2).split(".")[0] for m in INSTRUCTION.finditer(sass))
    loop = loop_body(sass)
    loop_ops = collections.Counter(op.split(".")[0] for _, op, _ in loop)
    regs = re.search(r"REG:(\d+)", res)
    return {"ptx_cvt": cvt, "sass_ops": ops, "sass_total": sum(ops.values()), "loop_ops": loop_ops,
            "loop_total": len(loop), "loop_detail": collections.Counter(op for _, op, _ in loop),
            "regs": int(regs.group(1)) if regs else -1, "smem": kernel.metadata.shared, "sass": sass, "ptx": ptx}  # fmt: skip


def programs_per_sm(regs: int, smem: int, warps: int) -> int:
    """Programs of ``warps`` warps that fit on an H100/H200 SM: 64K registers, 227 KB of shared memory (+1 KB
    reserved per program), 64 warps."""
    by_regs = 65536 // max(1, regs * 32 * warps) if regs > 0 else 64
    return min(by_regs, (227 * 1024) // (smem + 1024), 64 // warps)


CONVERSION_OPS = ("F2FP", "F2F", "I2F", "HADD2", "HMUL2", "PRMT", "LOP3", "SHF", "IMAD", "FMUL", "HMMA", "LDS", "LDSM",
                  "STS", "LDG", "LDGSTS", "MUFU", "FFMA", "FADD")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="64/4/2", help="comma-separated tile_n/warps/stages")
    parser.add_argument("--group", type=int, default=2, help="query heads per KV head (W1: 2, W2: 4)")
    parser.add_argument("--queries", type=int, default=1, help="query rows per sequence (a verify step: 1 + k)")
    parser.add_argument("--prefill", default="", help="also the prefill kernel: comma-separated block_m/tile_n/warps/stages")
    parser.add_argument("--verbose", action="store_true", help="every opcode of the loop with its modifiers")
    parser.add_argument("--dump", default="", help="write each variant's PTX and SASS into this folder")
    parser.add_argument("--max-registers", type=int, default=None, help="Triton's maxnreg for the decode kernel")
    opts = parser.parse_args()
    for spec in opts.configs.split(","):
        tile_n, warps, stages = (int(x) for x in spec.split("/"))
        print(f"\n## decode kernel, group {opts.group}, {opts.queries} queries, tile {tile_n} / {warps} warps / "
              f"{stages} stages, sm_90")
        for label, cache_ty, dot_ty, v_pairs, split_v in VARIANTS:
            info = summarize(compile_decode(cache_ty, dot_ty, v_pairs, tile_n, warps, stages, group=opts.group,
                                            queries=opts.queries, split_v=split_v,
                                            max_registers=opts.max_registers))  # fmt: skip
            cvts = ", ".join(f"{k} x{v}" for k, v in sorted(info["ptx_cvt"].items()) if "f32.s32" not in k)
            ops = ", ".join(f"{k} {info['loop_ops'][k]}" for k in CONVERSION_OPS if info["loop_ops"][k])
            spills = len(re.findall(r"\b(?:STL|LDL)\b", info["sass"]))
            print(f"- {label}: {info['loop_total']} SASS instructions in the key-tile loop ({info['sass_total']} in all), "
                  f"{info['loop_total'] * 64 / tile_n:.0f} per 64 keys; {info['regs']} regs, {info['smem']} B smem, "
                  f"{programs_per_sm(info['regs'], info['smem'], warps)} programs per SM, "
                  f"{spills} spill instructions")  # fmt: skip
            print(f"    PTX cvt (whole kernel): {cvts or 'none'}")
            print(f"    loop SASS: {ops}")
            if opts.verbose:
                print("    loop detail: " + ", ".join(f"{k} {v}" for k, v in sorted(info["loop_detail"].items())))
            if opts.dump:
                base = Path(opts.dump) / (f"decode_{tile_n}_{warps}_{stages}_{cache_ty}_{dot_ty}{'_pairs' * v_pairs}"
                                          f"{'_split' * split_v}"
                                          f"{f'_q{opts.queries}' * (opts.queries > 1)}")
                base.parent.mkdir(parents=True, exist_ok=True)
                base.with_suffix(".ptx").write_text(info["ptx"])
                base.with_suffix(".sass").write_text(info["sass"])
    for spec in filter(None, opts.prefill.split(",")):
        block_m, tile_n, warps, stages = (int(x) for x in spec.split("/"))
        print(f"\n## prefill kernel, group {opts.group}, block_m {block_m} / tile {tile_n} / {warps} warps / {stages} stages")
        for label, cache_ty, dot_ty, v_pairs, split_v in VARIANTS:
            info = summarize(compile_prefill(cache_ty, dot_ty, v_pairs, block_m, tile_n, warps, stages,
                                             group=opts.group, split_v=split_v))
            mma = ", ".join(f"{k} {v}" for k, v in sorted(info["loop_detail"].items()) if "MMA" in k or "GMMA" in k)
            print(f"- {label}: {info['loop_total']} SASS instructions in the loop, {info['regs']} regs, "
                  f"{info['smem']} B smem; {mma}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
