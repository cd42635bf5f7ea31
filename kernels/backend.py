"""Which implementation a kernel dispatcher runs, named by the caller.

The model is built with an attention backend and a kernel backend (see ``EngineConfig``); every layer hands its
backend to the dispatchers it calls, so nothing here depends on process-wide state:

- ``"auto"``: the Triton kernel for CUDA tensors, the torch reference otherwise;
- ``"triton"``: the same choice, spelled out (Triton on CUDA; a CPU tensor has no Triton path outside the
  interpreter, so it still takes the reference);
- ``"torch"``: always the torch reference (debugging; it syncs with the host and is not CUDA-graph safe).
"""

from __future__ import annotations

import functools

import torch

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str, what: str = "kernel backend") -> str:
    """``backend`` itself, or a ValueError naming the valid ones (checked once, at construction, not per call)."""
    if backend not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}, got '{backend}'.")
    return backend


def resolve_backends(attention_backend: str, kernel_backend: str) -> tuple[str, str]:
    """Checked ``(attention_backend, kernel_backend)``; a ``"torch"`` kernel backend puts attention on the reference
    too ("every kernel on its reference"), whatever the attention backend says."""
    check_backend(attention_backend, "attention backend")
    check_backend(kernel_backend)
    return ("torch" if kernel_backend == "torch" else attention_backend), kernel_backend


def use_triton(tensor: torch.Tensor, backend: str) -> bool:
    """The Triton kernel runs on CUDA tensors unless ``backend`` is ``"torch"``; CPU tensors take the reference."""
    return tensor.is_cuda and backend != "torch"


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int | None) -> int:
    """Multiprocessor count (static per device); 132 (an H100 SXM) when there is no CUDA device (interpreter)."""
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index if device_index is not None else 0).multi_processor_count
