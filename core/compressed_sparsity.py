"""Sparse weights stored compressed (compressed-tensors ``sparsity_config``: ``sparse-24-bitmask``, the 2:4 sparse
releases such as RedHatAI's ``*-2of4`` models, alone or with FP8 / INT8 weights; ``sparse-bitmask``, unstructured),
decompressed as the checkpoint streams in, so every layer loads the dense ``weight`` it would have held.

Each compressed weight ``{module}.weight`` is three tensors: ``{module}.shape`` (the dense ``[rows, columns]``),
``{module}.compressed`` (the kept values in row-major order, in the weight's dtype: fp8 / int8 for quantized
checkpoints) and ``{module}.bitmask`` (uint8 ``[rows, ceil(columns / 8)]``: column ``8 b + i`` of a row kept when
bit ``i`` of its byte ``b`` is set, numpy's little bit order); ``sparse-bitmask`` adds ``{module}.row_offsets``,
which the row-major order makes unnecessary. The dense weights then run the dense kernels (vLLM runs 2:4 weights on
sparse tensor cores, which have none here): the same numbers, the dense weights' bytes and speed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

SPARSE_FORMATS = ("sparse-24-bitmask", "sparse-bitmask")  # decompressed at load
_PARTS = ("shape", "compressed", "bitmask")
_IGNORED_PARTS = ("row_offsets",)


def compressed_sparsity(hf_config: dict[str, Any]) -> str | None:
    """The checkpoint's compressed sparsity format (one of ``SPARSE_FORMATS``), or None (none, or stored dense)."""
    qc = hf_config.get("quantization_config") or hf_config.get("compression_config") or {}
    fmt = str((qc.get("sparsity_config") or {}).get("format") or "dense")
    return fmt if fmt in SPARSE_FORMATS else None


def unpack_bitmask(bitmask: torch.Tensor, columns: int) -> torch.Tensor:
    """``[rows, ceil(columns / 8)]`` uint8 -> ``[rows, columns]`` bool: bit ``i`` of byte ``b`` is column ``8b + i``."""
    bits = (bitmask.to(torch.int32)[:, :, None] >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :columns].bool()


def decompress(shape: torch.Tensor, compressed: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The dense weight: zeros, with the kept values in their places (byte copies, so fp8 values move as they are)."""
    rows, columns = (int(v) for v in shape.flatten().tolist())
    kept = unpack_bitmask(bitmask, columns)
    if int(kept.sum()) != compressed.numel():
        raise ValueError(f"a compressed sparse weight's bitmask marks {int(kept.sum())} values, its compressed tensor "
                         f"holds {compressed.numel()}.")
    dense = torch.zeros(rows, columns, dtype=compressed.dtype)
    as_bytes = dense.view(torch.uint8) if compressed.element_size() == 1 else dense
    values = compressed.view(torch.uint8) if compressed.element_size() == 1 else compressed
    as_bytes[kept] = values.flatten()
    return dense


def decompress_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint stream with each compressed weight's parts replaced by ``{module}.weight`` (dense), yielded
    once its three parts have streamed by (any order; a part without the others is an error at the end)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    count = 0
    for name, tensor in weights:
        module, _, part = name.rpartition(".")
        if part in _IGNORED_PARTS:
            continue
        if part not in _PARTS:
            yield name, tensor
            continue
        parts = pending.setdefault(module, {})
        parts[part] = tensor
        if len(parts) == len(_PARTS):
            del pending[module]
            count += 1
            yield f"{module}.weight", decompress(parts["shape"], parts["compressed"], parts["bitmask"])
    if pending:
        module, parts = next(iter(pending.items()))
        raise ValueError(f"compressed sparse weight {module!r} lacks {sorted(set(_PARTS) - set(parts))} in the "
                         "checkpoint.")
    logger.info("Decompressed %d sparse weights at load: they run as dense weights (no sparse kernels here).", count)
