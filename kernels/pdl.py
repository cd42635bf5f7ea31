"""Programmatic dependent launch (PDL, Hopper): the decode chain's kernels overlap their launch with the kernel
before them.

A decode step at batch 1 is ~300 short kernels (W3: norms, attention, the GEMMs), and each boundary costs about a
microsecond of launch latency in a CUDA graph, ~7% of the step. A kernel launched with PDL may start while the
kernel before it is still running, once every program of that one has called ``gdc_launch_dependents``; it must
call ``gdc_wait`` (``griddepcontrol.wait``: the previous kernel has finished and its writes are visible) before it
reads anything a kernel wrote or writes anything a kernel reads. So every PDL kernel here starts with
:func:`wait_then_release` (after, for a GEMM, loading its first weight tiles, which no kernel writes), and
releases its own dependents right after the wait. The RMSNorm releases its GEMM before it waits
(:func:`release_early`): that GEMM then loads its first weight tiles while the GEMM before the norm still streams,
and the norm's own loads do not queue behind them (a batch-1 step 3% faster, RESULTS.md, nineteenth session).
Kernels launched without PDL wait as usual; the release is a no-op for them. The engine turns it on in the model
runner (``EngineConfig.enable_pdl``, default on; ``--no-enable-pdl`` or ``LLM(enable_pdl=False)`` keeps it off);
outside an engine it is off unless :func:`configure` says otherwise.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # griddepcontrol intrinsics: Triton >= 3.5 on Hopper
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # pragma: no cover - older Triton
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


ENABLED = False


def configure(enabled: bool) -> None:
    """Launch the decode chain's Triton kernels with PDL (where the GPU supports it) from now on."""
    global ENABLED
    ENABLED = bool(enabled)


@functools.lru_cache(maxsize=None)
def pdl_supported(device_index: int) -> bool:
    return HAS_GDC and torch.cuda.get_device_capability(device_index)[0] >= 9


def can_use_pdl(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s device can launch with PDL at all (a CUDA GPU of compute capability 9+, Triton's
    griddepcontrol)."""
    return tensor.is_cuda and pdl_supported(tensor.device.index or 0)


def use_pdl(tensor: torch.Tensor) -> bool:
    """Whether a kernel on ``tensor``'s device launches with PDL now."""
    return ENABLED and can_use_pdl(tensor)


def launch_options(pdl: bool) -> dict:
    """A decode-chain kernel's PDL launch arguments: its ``USE_PDL`` constexpr and, when on, the launch keyword
    that asks Triton for PDL."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl else {"USE_PDL": False}


@triton.jit
def wait_then_release(USE_PDL: tl.constexpr, RELEASED: tl.constexpr = False):
    """Wait for the previous kernel (its writes visible), then let the next PDL kernel start launching (unless
    :func:`release_early` already did)."""
    if USE_PDL:
        gdc_wait()
        if not RELEASED:
            gdc_launch_dependents()


@triton.jit
def release_early(EARLY: tl.constexpr):
    """Let the next PDL kernel start launching before this one waits (``EARLY``: PDL on and the launcher asked)."""
    if EARLY:
        gdc_launch_dependents()
