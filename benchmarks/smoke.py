"""``--smoke`` runs of the kernel benchmarks: without CUDA they run under the Triton interpreter, which has to be
switched on before ``kernels/`` is imported (so each script calls this first)."""

from __future__ import annotations

import os
import sys


def interpret_smoke_without_cuda(argv: list[str] | None = None) -> None:
    """Set ``TRITON_INTERPRET=1`` for a ``--smoke`` run on a machine without CUDA (unless already set)."""
    if "--smoke" in (sys.argv if argv is None else argv) and not os.environ.get("TRITON_INTERPRET"):
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
