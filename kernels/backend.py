"""Which implementation a kernel dispatcher picks: Triton on CUDA tensors, the torch reference otherwise.

``PAGEDSERVE_KERNEL_BACKEND=torch`` forces every dispatcher onto its reference; ``PAGEDSERVE_ATTENTION_BACKEND=torch``
only attention. Read once at import so that the per-call cost in the hot path is one attribute lookup.
"""

from __future__ import annotations

import functools
import os

import torch

FORCE_TORCH_KERNELS = os.environ.get("PAGEDSERVE_KERNEL_BACKEND", "").lower() == "torch"
FORCE_TORCH_ATTENTION = FORCE_TORCH_KERNELS or os.environ.get("PAGEDSERVE_ATTENTION_BACKEND", "").lower() == "torch"


def use_triton(tensor: torch.Tensor, *, attention: bool = False) -> bool:
    """Triton kernels run on CUDA tensors unless forced off; CPU tensors take the torch reference."""
    if not tensor.is_cuda:
        return False
    return not (FORCE_TORCH_ATTENTION if attention else FORCE_TORCH_KERNELS)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int | None) -> int:
    """Multiprocessor count (static per device); 132 (an H100 SXM) when there is no CUDA device (interpreter)."""
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index if device_index is not None else 0).multi_processor_count
