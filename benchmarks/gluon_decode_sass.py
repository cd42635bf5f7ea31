"""What the compiler makes of the Gluon fp8 decode kernel's loop (kernels/fp8_decode_gluon.py), without a GPU.

    python benchmarks/gluon_decode_sass.py              # W2's query group (4); --group 2 for W1's

Compiles ``_gluon_decode_kernel`` for sm_90 (Triton's bundled ptxas / cuobjdump) at the module's ring depth and
register cap, and prints its registers, stack and the opcodes of the key-tile loop. The point of the kernel is the
path the fp8 tiles take: 16-byte cp.async into shared memory (``LDGSTS``), 16-byte loads straight into each thread's
mma fragments (``LDS.128``), packed e4m3 -> fp16 conversions (``F2FP.F16.E4M3.UNPACK_B``) and ``HMMA``, with no
shared-memory store or ldmatrix; the Triton kernel's loop stages every fp8 tile through shared memory three times
(``benchmarks/attention_sass.py``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("gluon_decode_sass.py compiles the kernel: run it without TRITON_INTERPRET=1")

from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from benchmarks.attention_sass import _compile, loop_body, sass_and_resources  # noqa: E402
from kernels import fp8_decode_gluon  # noqa: E402

POINTERS = {"out_ptr": "*bf16", "q_ptr": "*bf16", "k_ptr": "*u8", "v_ptr": "*u8", "table_ptr": "*i32",
            "seq_lens_ptr": "*i32", "query_start_ptr": "*i32", "order_ptr": "*i32"}  # fmt: skip


def compile_gluon_decode(group: int = 4, block_size: int = 16, max_registers: int | None = None,
                         stages: int | None = None, keys: int | None = None, use_pdl: bool = False):  # fmt: skip
    """The kernel for sm_90 with the argument types and 16-divisibility the JIT would see on the GPU, at the module's
    ring depth (``STAGES``) and keys per warp (``KEYS_PER_WARP``) unless given; ``max_registers`` is Triton's
    ``maxnreg`` (``gluon_fp8_decode`` launches at the module's ``MAX_REGISTERS``)."""
    stages = stages or fp8_decode_gluon.STAGES
    keys = keys or fp8_decode_gluon.KEYS_PER_WARP
    k_tile, v_tile, scores = fp8_decode_gluon.tile_layouts(keys)
    return _compile(fp8_decode_gluon._gluon_decode_kernel, POINTERS, {"qk_scale", "v_scale"},
                    {"GROUP": group, "BLOCK_SIZE": block_size, "STAGES": stages,
                     "KEYS": keys, "K_TILE": k_tile, "V_TILE": v_tile, "SCORES": scores,
                     "USE_PDL": use_pdl}, 4, 1,
                    max_registers=max_registers, source_cls=GluonASTSource)  # fmt: skip


def summarize(compiled) -> dict:
    sass, resources = sass_and_resources(compiled.asm["cubin"])
    loop = collections.Counter(op for _, op, _ in loop_body(sass))
    usage = dict(re.findall(r"(REG|SHARED|STACK):(\d+)", resources))
    return {"registers": int(usage.get("REG", 0)), "stack": int(usage.get("STACK", 0)),
            "shared": int(usage.get("SHARED", 0)), "loop_total": sum(loop.values()), "loop": dict(loop)}


def print_summary(info: dict, headline: str, as_json: bool) -> None:
    """One JSON line, or the headline and the loop's opcodes, most frequent first."""
    if as_json:
        print(json.dumps(info))
        return
    print(headline)
    for op, count in sorted(info["loop"].items(), key=lambda kv: -kv[1]):
        print(f"  {op:<28} {count}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head (W2: 4, W1: 2)")
    parser.add_argument("--max-registers", type=int, default=fp8_decode_gluon.MAX_REGISTERS,
                        help="Triton's maxnreg (default: the cap the kernel launches with; 0: the compiler's choice)")
    parser.add_argument("--stages", type=int, default=fp8_decode_gluon.STAGES, help="tiles in the cp.async ring")
    parser.add_argument("--keys", type=int, default=fp8_decode_gluon.KEYS_PER_WARP, choices=(16, 32),
                        help="keys per warp per tile")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    opts = parser.parse_args()
    info = summarize(compile_gluon_decode(opts.group, max_registers=opts.max_registers or None,
                                         stages=opts.stages, keys=opts.keys))
    print_summary(info, f"Gluon fp8 decode, group {opts.group}, sm_90: {info['registers']} registers, "
                        f"{info['stack']} B stack; key-tile loop ({4 * opts.keys} keys, {opts.keys} per warp, "
                        f"{opts.stages} stages): {info['loop_total']} instructions per warp", opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
