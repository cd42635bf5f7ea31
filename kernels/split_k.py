"""Launch shape of the skinny (decode) GEMMs that dequantize weights in registers (``fp8_linear``, ``int4_gemm``).

At M <= 16 a GEMM is one pass over its weight, so it needs enough programs to keep every SM's memory pipe busy (about
two per SM). Narrower output blocks give more programs for free; splitting K also does, but costs fp32 partial sums
and a reduction launch afterwards (two more kernels per layer per step), so it is the last resort: small layers only.
"""

from __future__ import annotations

import triton

from kernels.backend import num_sms

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
