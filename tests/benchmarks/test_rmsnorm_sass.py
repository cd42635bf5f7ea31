"""The RMSNorm releases the GEMM it feeds before it waits on the kernel before it, and decode attention can
(kernels/pdl.py): compiled for sm_90 without a GPU (Triton's bundled ptxas), in a subprocess without
TRITON_INTERPRET."""

from __future__ import annotations

from tests.benchmarks.offline_sass import needs_sass_tools, run_compile_script

COMPILE = """
import json
from benchmarks.attention_sass import _compile, sass_and_resources
from kernels import rmsnorm
pointers = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16", "q_ptr": "*u8",
            "scale_ptr": "*fp32"}
out = {"default": rmsnorm.RELEASE_BEFORE_WAIT}
for early in (True, False):
    kernel = _compile(rmsnorm._rms_norm_kernel, pointers, {"eps"}, dict(HAS_RESIDUAL=True, ROWS=1, BLOCK_N=4096,
                      QUANTIZE=True, FP8_MAX=448.0, MIN_SCALE=1e-6, USE_PDL=True, EARLY_RELEASE=early), 8, 1)
    # the instruction only (Triton 3.6 writes "griddepcontrol.wait; // dummy %r2", 3.9 "griddepcontrol.wait;")
    ptx = [line.split("//")[0].replace(" ", "").strip() for line in kernel.asm["ptx"].splitlines()
           if "griddepcontrol" in line]
    sass = [line.split(";")[0].split()[-1] for line in sass_and_resources(kernel.asm["cubin"])[0].splitlines()
            if "PREEXIT" in line or "ACQBULK" in line]
    out[str(early)] = {"ptx": ptx, "sass": sass}
print(json.dumps(out))
"""


@needs_sass_tools
def test_rmsnorm_releases_its_gemm_before_it_waits():
    """By default the norm's ``griddepcontrol.launch_dependents`` (SASS ``PREEXIT``) comes before its
    ``griddepcontrol.wait`` (``ACQBULK``), each once; without the early release, after it."""
    result = run_compile_script(COMPILE)
    assert result["default"] is True
    early, late = result["True"], result["False"]
    assert early["ptx"] == ["griddepcontrol.launch_dependents;", "griddepcontrol.wait;"], early
    assert early["sass"] == ["PREEXIT", "ACQBULK"], early
    assert late["ptx"] == ["griddepcontrol.wait;", "griddepcontrol.launch_dependents;"], late
    assert late["sass"] == ["ACQBULK", "PREEXIT"], late


ATTENTION = """
import json
from benchmarks.attention_sass import compile_decode, sass_and_resources
from kernels import decode_attention
out = {"default": decode_attention.RELEASE_BEFORE_WAIT}
for early in (True, False):
    kernel = compile_decode("bf16", "bf16", False, 64, 4, 2, group=4, NUM_SPLITS=8, SPLITS_PAD=8, FUSED_REDUCE=True,
                            USE_PDL=True, PRE_WAIT_KV=True, EARLY_RELEASE=early)
    # the instruction only (Triton 3.6 writes "griddepcontrol.wait; // dummy %r2", 3.9 "griddepcontrol.wait;")
    ptx = [line.split("//")[0].replace(" ", "").strip() for line in kernel.asm["ptx"].splitlines()
           if "griddepcontrol" in line]
    out[str(early)] = ptx
print(json.dumps(out))
"""


@needs_sass_tools
def test_decode_attention_can_release_o_proj_before_it_waits():
    """``decode_attention.RELEASE_BEFORE_WAIT`` (off by default) moves the split decode's release (reading its first
    keys and values before the wait) ahead of its wait; off, the release follows the wait, once each."""
    result = run_compile_script(ATTENTION)
    assert result["default"] is False
    assert result["True"] == ["griddepcontrol.launch_dependents;", "griddepcontrol.wait;"], result
    assert result["False"] == ["griddepcontrol.wait;", "griddepcontrol.launch_dependents;"], result
