"""A throughput run (``benchmarks.throughput``) with the fp8 decode GEMV's table and fusions changed first: what a
candidate entry of ``kernels/fp8_linear.py: FP8_GEMV_CONFIGS`` does to a whole decode step, before it is written in.

    python -m benchmarks.fp8_gemv_variants "qkv=GemvConfig(4, 4, preload=1, staged=1, quantize_once=True)" \\
        --workload W3 --model .models/llama-3.1-8b --load-format dummy --quantization fp8 --runs 5

The first argument is ``;``-separated changes (``table`` for none): ``NAME=GemvConfig(...)`` or ``NAME=None`` sets
the entry of a Llama-3.1-8B projection (``qkv``, ``o``, ``gate_up``, ``down``) or of an ``N,K`` shape
(``6144,4096=...``); ``no-silu`` / ``no-norm`` / ``no-rope`` turn the GEMV's SiLU-and-mul epilogue, RMSNorm
prologue or rotary epilogue off; ``attn-early`` lets o_proj launch before decode attention waits on qkv; ``slots=N``
sets how many scratch rows the quantize-once programs share; ``merge-chunk=N`` the (rows x splits) chunk of split
decode attention's fused merge; ``mlp-half`` (or ``mlp-half=MlpHalfConfig(...)``) runs o_proj, the post-attention
norm and the MLP as one launch (``kernels/fp8_mlp_gluon.py``), ``no-tickets`` with its tasks by program id. The
rest of the arguments are ``benchmarks.throughput``'s. Compare variants run on one machine, in turn.
"""

from __future__ import annotations

import importlib
import sys

LLAMA_8B_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LLAMA_8B_MLP_HALF = (4096, 4096, 14336)  # hidden, q_size, intermediate: kernels/fp8_mlp_gluon.py's table key
# name -> (module, attribute, value it is set to)
SWITCHES = {"no-silu": ("kernels.fp8_linear", "SILU_EPILOGUE_ENABLED", False),
            "no-norm": ("kernels.fp8_linear", "NORM_PROLOGUE_ENABLED", False),
            "no-rope": ("kernels.fp8_linear", "ROPE_CACHE_ENABLED", False),
            "attn-early": ("kernels.decode_attention", "RELEASE_BEFORE_WAIT", True),
            "no-tickets": ("kernels.fp8_mlp_gluon", "TICKETS", False)}


def apply_variant(variant: str) -> list[str]:
    """Apply ``variant``'s changes to the kernel modules; returns them as applied, one line each."""
    import kernels.fp8_gemv_gluon as gemv
    import kernels.fp8_linear as fp8
    from kernels.fp8_gemv_gluon import GemvConfig

    applied = []
    for item in (part.strip() for part in variant.split(";")):
        if item in ("", "table"):
            continue
        if item in SWITCHES:
            module, attribute, value = SWITCHES[item]
            setattr(importlib.import_module(module), attribute, value)
        elif item.startswith("merge-chunk="):
            importlib.import_module("kernels.decode_attention").MERGE_CHUNK = int(item.removeprefix("merge-chunk="))
        elif item == "mlp-half" or item.startswith("mlp-half="):
            from kernels import fp8_mlp_gluon

            value = item.partition("=")[2] or "MlpHalfConfig()"
            config = eval(value, {"GemvConfig": GemvConfig, "MlpHalfConfig": fp8_mlp_gluon.MlpHalfConfig})
            if not isinstance(config, fp8_mlp_gluon.MlpHalfConfig):
                raise ValueError(f"{value!r} is not a MlpHalfConfig(...)")
            fp8_mlp_gluon.MLP_HALF_CONFIGS[LLAMA_8B_MLP_HALF] = config
        elif item.startswith("slots="):
            gemv.QUANT_ONCE_SLOTS = int(item.removeprefix("slots="))
        elif "=" in item:
            name, value = (side.strip() for side in item.split("=", 1))
            key = LLAMA_8B_SHAPES.get(name) or tuple(int(d) for d in name.split(","))
            if len(key) != 2:
                raise ValueError(f"{name!r} is neither a Llama-8B projection ({sorted(LLAMA_8B_SHAPES)}) nor N,K")
            config = None if value == "None" else eval(value, {"GemvConfig": GemvConfig})
            if config is not None and not isinstance(config, GemvConfig):
                raise ValueError(f"{value!r} is not a GemvConfig(...) or None")
            fp8.FP8_GEMV_CONFIGS[key] = config
        else:
            raise ValueError(f"unknown change {item!r}: NAME=GemvConfig(...), {', '.join(SWITCHES)}, slots=N, "
                             "merge-chunk=N or mlp-half[=MlpHalfConfig(...)]")
        applied.append(item)
    return applied


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit(__doc__)
    applied = apply_variant(argv[0])
    print(f"variant: {'; '.join(applied) or 'table'}", file=sys.stderr)
    from benchmarks.throughput import main as throughput

    return throughput(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
