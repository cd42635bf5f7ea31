"""Host -> device copies that never block the host.

A copy from pageable host memory makes CUDA synchronize the stream first, so a single ``torch.tensor(...).to("cuda")``
in the step path would make the host wait for the step in flight and defeat async scheduling. Everything the step
path uploads goes through here: into pinned memory (torch's caching host allocator, which keeps a buffer alive
until its copy is done), then a non-blocking copy.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values: np.ndarray | list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
    host = host.to(dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
