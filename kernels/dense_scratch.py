"""One dense-weight scratch buffer per device and dtype, for the weight-only formats that dequantize a layer's weight
before a cuBLAS GEMM when x has many rows (int4 past 16 rows, the byte-code formats past 4).

Layers run one after another on one stream, so one buffer, grown to the largest layer, serves them all. The engine's
profile run (the longest prefill) grows it before the KV cache is sized and before CUDA graphs are captured, so its
address is fixed in the graphs.
"""

from __future__ import annotations

import torch

_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dense_weight_scratch(device: torch.device, dtype: torch.dtype, n: int, k: int) -> torch.Tensor:
    """A ``[n, k]`` view of the device's ``dtype`` scratch buffer (grown if needed)."""
    key = (device, dtype)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < n * k:
        buffer = _SCRATCH[key] = torch.empty(n * k, dtype=dtype, device=device)
    return buffer[: n * k].view(n, k)
