"""Launch shape of the skinny (decode) GEMMs that dequantize weights in registers (``fp8_linear``, ``int4_gemm``).

At M <= 16 a GEMM is one pass over its weight, so it needs enough programs to keep every SM's memory pipe busy (about
two per SM). Narrower output blocks give more programs for free; splitting K also does, but costs fp32 partial sums
and a reduction launch afterwards (two more kernels per layer per step), so it is the last resort: small layers only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton

from kernels.backend import num_sms

if TYPE_CHECKING:
    from kernels.skinny_gemm import SkinnyConfig

PROGRAMS_PER_SM = 2


def decode_launch(n: int, k_blocks: int, device_index: int | None, block_ns: tuple[int, ...] = (64, 32, 16)
                  ) -> tuple[int, int]:  # fmt: skip
    """``(block_n, split_k)``: the widest block in ``block_ns`` (descending) giving ``PROGRAMS_PER_SM`` programs per
    SM; else the narrowest, unsplit if that still covers every SM once, split over just enough programs if not."""
    sms = num_sms(device_index)
    for block_n in block_ns:
        if triton.cdiv(n, block_n) >= PROGRAMS_PER_SM * sms:
            return block_n, 1
    block_n = block_ns[-1]
    n_blocks = triton.cdiv(n, block_n)
    if n_blocks >= sms:
        return block_n, 1
    return block_n, max(1, min(k_blocks, triton.cdiv(PROGRAMS_PER_SM * sms, n_blocks)))


def tensor_core_split_k(n: int, k: int, config: SkinnyConfig, device_index: int | None) -> int:
    """K splits for a tensor-core decode config (fp8 ``mma`` / ``mmq``, int4 ``mma`` / ``mms``): the config's own
    ``:kS`` where a sweep pinned one, else :func:`decode_launch`'s rule at the config's fixed block_n (1 where the
    output blocks already cover every SM, else just enough programs for ``PROGRAMS_PER_SM`` per SM)."""
    if config.split_k:
        return config.split_k
    return decode_launch(n, triton.cdiv(k, config.block_k), device_index, block_ns=(config.block_n,))[1]
