"""Tasks of one launch that wait on each other: a ticket gives each program its task, arrival counters say when a
task's inputs are written.

Why: at batch 1 a decode step is a chain of kernels, and each boundary costs the producer grid's completion, the
consumer's ``griddepcontrol.wait`` and a memory trip (``kernels/NOTES.md``, the persistent decode step). Tasks of
one launch hand over through a counter instead: the consumer polls it from L2 while its weight is already in its
registers. Measured on the MLP half (``kernels/fp8_mlp_gluon.py``): the hand-over costs no less than the boundary.

Why a ticket and not the program id: a task waits only on tasks with smaller tickets, and a program takes its ticket
when it starts running, so every task a waiting program depends on is held by a program already resident, which
waits only on smaller tickets still: whatever order the hardware schedules programs in and however few fit at once,
nothing waits on a program that cannot start.

Ordering (the pattern of ``kernels/split_k.py`` and decode attention's merge): a producer's threads store, meet at a
CTA barrier, and one gpu-scope release increment publishes the stores; a consumer's thread polls with acquire
reads, and a CTA barrier after the one that saw the count orders every thread's loads after the producers' stores.

The counters live in :func:`task_counters` (zero between launches): the launch's last task resets the ones it
used, and stream order puts that before the next launch that uses them.
"""

from __future__ import annotations

import torch

from kernels.pdl import gdc_launch_dependents, gdc_wait

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from kernels.gemv_rows_gluon import _cta_barrier

    HAS_GLUON = True
except ImportError:  # pragma: no cover - a Triton without Gluon
    HAS_GLUON = False

COUNTERS = 8  # per device: a ticket and the arrival counters of one launch's stages
_counters: dict[torch.device, torch.Tensor] = {}


def task_counters(device: torch.device) -> torch.Tensor:
    """The device's int32 ticket and arrival counters (zero between launches). Allocated on first use, which must
    not be inside a CUDA graph capture (a capture's memory is not zeroed on replay): the engine's eager warm-up
    step comes first."""
    counters = _counters.get(device)
    if counters is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the task counters are first allocated inside a CUDA graph capture; run one step "
                               "eagerly first")
        counters = _counters[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return counters


if HAS_GLUON:

    @gluon.jit
    def take_ticket(ticket_ptr):
        """This program's task: the launch's programs count up from 0 in the order they start."""
        return gl.atomic_add(ticket_ptr, 1, sem="relaxed", scope="gpu")

    @gluon.jit
    def wait_for(counter_ptr, target):
        """Until ``counter_ptr`` reaches ``target``: one thread of the program polls it with acquire reads (an
        atomic add of 0, which the compiler makes a load: an L2 round trip, its result handed to the others through
        shared memory), sleeping a little between polls so a few hundred waiting programs leave the counter's L2
        slice to the producers; a CTA barrier after the read that saw it puts every thread's later loads after the
        producers' stores. No fence: a ``fence.acq_rel`` waits for the program's own loads in flight (the weight it
        loaded before waiting), which cost a W3-fp8 step 19% (RESULTS.md, thirty-second session)."""
        seen = gl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        while seen < target:
            gl.inline_asm_elementwise("nanosleep.u32 100;\n\tmov.u32 $0, $1;", "=r,r", [seen], dtype=gl.int32,
                                      is_pure=False, pack=1)
            seen = gl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        _cta_barrier()

    @gluon.jit
    def arrive(counter_ptr):
        """This program's stores done: publish them (CTA barrier, then a release increment). Returns the count
        before the increment, so the last of ``n`` arrivers sees ``n - 1`` (and, acquiring, every other's stores)."""
        _cta_barrier()
        return gl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")

    @gluon.jit
    def arrive_quietly(counter_ptr):
        """:func:`arrive` for a program that does not need the count: one thread's ``red.release`` (no reply to
        wait for), so the program can exit while the increment travels to L2."""
        _cta_barrier()
        gl.inline_asm_elementwise(
            "{\n\t.reg .pred first;\n\t.reg .b32 tid;\n\tmov.u32 tid, %tid.x;\n\tsetp.eq.u32 first, tid, 0;\n\t"
            "@first red.release.gpu.global.add.u32 [$1], 1;\n\tmov.u32 $0, 0;\n\t}", "=r,l", [counter_ptr],
            dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def inputs_ready(USE_PDL: gl.constexpr, WAIT_COUNTER: gl.constexpr, wait_ptr, wait_target):
        """The wait before a program reads what other kernels or tasks wrote: the PDL wait (the kernel before has
        finished), then (``WAIT_COUNTER``) ``wait_ptr`` reaching ``wait_target``; only then does it let the next
        PDL kernel launch, so a launch of tasks releases its successor when its last tasks' inputs are there, as a
        chain of kernels would."""
        if USE_PDL:
            gdc_wait()
        if WAIT_COUNTER:
            wait_for(wait_ptr, wait_target)
        if USE_PDL:
            gdc_launch_dependents()
