"""benchmarks/gluon_gemv_sass.py compiles the Gluon fp8 decode GEMM for sm_90 without a GPU and pins its K loop:
16-byte global loads straight into the mma fragments, packed e4m3 -> fp16 conversions and mma.sync, nothing else
per weight (no byte shuffles, no shared memory, no spills).

Compiled in a subprocess without TRITON_INTERPRET (the test session interprets the kernels)."""

from __future__ import annotations

import pytest

from tests.benchmarks.offline_sass import needs_sass_tools, run_compile_script

COMPILE = """
import json
from benchmarks.gluon_gemv_sass import compile_gemv, summarize
print(json.dumps({chunks: summarize(compile_gemv(4, chunks)) for chunks in (1, 2)}))
"""


@needs_sass_tools
def test_gluon_gemv_loop_is_loads_conversions_and_mma():
    pytest.importorskip("triton.experimental.gluon")
    for chunks, info in run_compile_script(COMPILE).items():
        chunks, loop = int(chunks), info["loop"]
        # per thread and chunk: 2 weight rows x 32 B and 32 B of x, 16 bytes a load
        loads = sum(count for op, count in loop.items() if op.startswith("LDG") and op.endswith(".128"))
        assert loads == 6 * chunks and loop.get("LDG.E.EF.128", 0) == 4 * chunks, (chunks, loop)  # weight: evict-first
        assert loop.get("F2FP.F16.E4M3.UNPACK_B", 0) == 48 * chunks, (chunks, loop)  # 96 fp8 values, 2 each
        assert loop.get("HMMA.16816.F32", 0) == 8 * chunks, (chunks, loop)  # 16 rows x 128 k per warp
        assert not any(op.startswith(("PRMT", "LDS", "STS", "LDL", "STL")) for op in loop), (chunks, loop)
        assert info["loop_total"] <= 100 * chunks, (chunks, info["loop_total"])
        assert info["stack"] == 0, info


# The loop's work per weight byte: loads, conversions, mma, and what must not be there (byte shuffles, shared or
# local memory). Other opcodes (the bounds' integer arithmetic, a constant reloaded) may move with register choices.
LOOP_WORK = ("LDG", "F2FP", "HMMA", "PRMT", "LDS", "STS", "LDL", "STL")

ROPE_COMPILE = """
import json
from benchmarks.gluon_gemv_sass import compile_gemv, summarize
print(json.dumps([summarize(compile_gemv(4, 4, rope_cache=rope)) for rope in (False, True)]))
"""


@needs_sass_tools
def test_rope_cache_epilogue_leaves_the_loop_alone():
    """The qkv GEMM with the attention prep in its epilogue (rotary pairs as mma row neighbours): the same K loop
    (loads, conversions, mma; only a constant reload or the bounds' arithmetic may differ), no spills."""
    pytest.importorskip("triton.experimental.gluon")
    plain, fused = run_compile_script(ROPE_COMPILE)
    ops = ({op: n for op, n in info["loop"].items() if op.startswith(LOOP_WORK)} for info in (plain, fused))
    assert next(ops) == next(ops), (plain["loop"], fused["loop"])
    assert abs(fused["loop_total"] - plain["loop_total"]) <= 4, (plain["loop_total"], fused["loop_total"])
    assert fused["stack"] == 0, fused


PRELOAD_COMPILE = """
import json
from benchmarks.gluon_gemv_sass import compile_gemv, summarize
print(json.dumps({f"{chunks} {quant_x} {preload}": summarize(compile_gemv(8, chunks, quant_x, use_pdl=True,
                                                                            preload=preload))
                  for chunks in (1, 2) for quant_x in (False, True) for preload in (0, 2)}))
"""


@needs_sass_tools
def test_preloaded_steps_leave_the_loop_alone():
    """Steps of weight loaded into registers before the PDL wait are peeled off the loop: the loop's loads,
    conversions and mma are those without them (no bytes repacked, nothing through shared or local memory; only its
    bounds' integer arithmetic may differ), with e4m3 rows and with rows quantized in the kernel, and nothing
    spills."""
    pytest.importorskip("triton.experimental.gluon")
    infos = run_compile_script(PRELOAD_COMPILE)
    for chunks in (1, 2):
        for quant_x in (False, True):
            plain, preloaded = infos[f"{chunks} {quant_x} 0"], infos[f"{chunks} {quant_x} 2"]
            ops = ({op: n for op, n in info["loop"].items() if op.startswith(LOOP_WORK)} for info in (plain, preloaded))
            assert next(ops) == next(ops), (chunks, quant_x, plain["loop"], preloaded["loop"])
            assert abs(preloaded["loop_total"] - plain["loop_total"]) <= 4, (chunks, quant_x)
            assert preloaded["stack"] == 0, (chunks, quant_x, preloaded)


STAGED_COMPILE = """
import collections, json, re
from benchmarks.attention_sass import sass_and_resources
from benchmarks.gluon_gemv_sass import compile_gemv, summarize
out = {}
for staged in (0, 1, 2):
    compiled = compile_gemv(8, 2, use_pdl=True, preload=2, staged=staged)
    ops = collections.Counter(re.findall(r"\\b(LDGSTS\\S*|LDS\\.128)", sass_and_resources(compiled.asm["cubin"])[0]))
    out[staged] = {"summary": summarize(compiled), "ops": ops, "dynamic_shared": compiled.metadata.shared}
print(json.dumps(out))
"""


@needs_sass_tools
def test_staged_steps_are_16_byte_copies_read_back_once():
    """Steps staged in shared memory before the PDL wait (down's 8 x 2 config): each thread's 32 KB step share is
    copied with 16-byte cp.async and read back with 128-bit shared loads once, outside the loop, whose loads,
    conversions and mma stay those without staging; shared memory holds the staged steps, and nothing spills."""
    pytest.importorskip("triton.experimental.gluon")
    infos = run_compile_script(STAGED_COMPILE)
    plain = infos["0"]
    for staged in (1, 2):
        info = infos[str(staged)]
        ops = ({op: n for op, n in i["summary"]["loop"].items() if op.startswith(LOOP_WORK)} for i in (plain, info))
        assert next(ops) == next(ops), (staged, plain["summary"]["loop"], info["summary"]["loop"])
        # a step is 16 rows x 2 KB = 32 KB over 256 threads: 8 copies of 16 bytes each, 8 reads back
        assert info["ops"].get("LDGSTS.E.BYPASS.128", 0) == 8 * staged, (staged, info["ops"])
        assert info["ops"].get("LDS.128", 0) == plain["ops"].get("LDS.128", 0) + 8 * staged, (staged, info["ops"])
        assert info["dynamic_shared"] >= staged * 32 * 1024, info["dynamic_shared"]
        assert info["summary"]["stack"] == 0, info["summary"]
    assert not any(op.startswith("LDGSTS") for op in plain["ops"]), plain["ops"]


FUSED_COMPILE = """
import json
from benchmarks.gluon_gemv_sass import compile_gemv, loops, summarize
down = dict(use_pdl=True, preload=2, staged=1, k=14336)  # Llama-8B's down as it runs
gate_up = dict(use_pdl=True, preload=2)
qkv = dict(use_pdl=True, preload=1, staged=1, rope_cache=True, k=4096)
out = {}
for name, kwargs in (("down", down), ("down once", dict(down, quant_once=True)), ("gate_up", gate_up),
                     ("gate_up silu", dict(gate_up, silu_mul=True)), ("qkv", qkv), ("qkv norm", dict(qkv, norm=2)),
                     ("qkv first norm", dict(qkv, norm=1))):
    compiled = compile_gemv(8 if name.startswith("down") else 4, 4 if name.startswith("qkv") else 2, **kwargs)
    out[name] = dict(summarize(compiled), loops=loops(compiled))
print(json.dumps(out))
"""


def _loop_work(loop: dict[str, int]) -> dict[str, int]:
    return {op: n for op, n in loop.items() if op.startswith(LOOP_WORK)}


@needs_sass_tools
def test_silu_epilogue_rows_quantized_once_and_norm_prologue_leave_the_loop_alone():
    """gate_up with the SiLU-and-mul epilogue, down quantizing its bf16 rows once after the wait, qkv norming them
    first: each K loop has the loads, conversions and mma of the plain one; down keeps at most 128 registers (two
    8-warp programs an SM), qkv 168 (three 4-warp ones), and nothing spills; the rows' quantization is 16-byte
    loads."""
    pytest.importorskip("triton.experimental.gluon")
    infos = run_compile_script(FUSED_COMPILE)
    for plain, fused in (("down", "down once"), ("gate_up", "gate_up silu"), ("qkv", "qkv norm"),
                         ("qkv", "qkv first norm")):
        assert _loop_work(infos[fused]["loops"][-1]) == _loop_work(infos[plain]["loops"][-1]), (plain, infos[fused])
        assert infos[fused]["stack"] == 0, infos[fused]
    assert infos["down once"]["registers"] <= 128, infos["down once"]["registers"]
    # qkv's 384 programs of 4 warps all resident at once (three an SM), so all preload before their wait
    assert max(infos[name]["registers"] for name in ("qkv norm", "qkv first norm")) <= 168, infos["qkv norm"]
    rows_loop = infos["down once"]["loops"][0]
    # 7 pieces of 2,048 bf16 a row: 16-byte loads for the absmax pass, and again (L1 hits) for the quantization
    assert 7 <= rows_loop.get("LDG.E.128", 0) <= 14, rows_loop
    assert not any(op.startswith(("LDL", "STL")) for op in rows_loop), rows_loop


MLP_HALF_COMPILE = """
import json
from benchmarks.gluon_gemv_sass import compile_mlp_half
from benchmarks.gluon_decode_sass import summarize
compiled = compile_mlp_half()
ptx = compiled.asm["ptx"]
print(json.dumps({"registers": summarize(compiled)["registers"], "fences": ptx.count("fence."),
                  "acquire_polls": ptx.count("ld.global.gpu.acquire"), "quiet_arrivals": ptx.count("red.release")}))
"""


@needs_sass_tools
def test_mlp_half_waits_without_a_fence():
    """The one-launch MLP half (Llama-8B's shapes): its tasks wait with one thread's acquire reads (gate_up for the
    norm, down for gate_up: a first read and the polling loop's each) and no ``fence.acq_rel``, which would wait
    for the weight the program loaded before waiting (a W3-fp8 step 19% slower); gate_up arrives with one
    ``red.release``; two 8-warp programs fit an SM."""
    pytest.importorskip("triton.experimental.gluon")
    info = run_compile_script(MLP_HALF_COMPILE)
    assert info["fences"] == 0 and info["acquire_polls"] == 4 and info["quiet_arrivals"] == 1, info
    assert info["registers"] <= 128, info
