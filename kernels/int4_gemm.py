"""int4 weight GEMM (w4a16): ``out[M, N] = x[M, K] @ W[K, N]`` with ``W`` dequantized in registers.

Weight layout: ``qweight`` int32 ``[K / 8, N]``, input row ``8j + i`` of column ``n`` in bits ``4i..4i+3`` of
``qweight[j, n]``; ``scales`` and ``zeros`` ``[K / group, N]`` (zeros as numbers, in the activation dtype);
``W[k, n] = (q[k, n] - zeros[k // group, n]) * scales[k // group, n]``. A ``perm`` (GPTQ act-order) gathers x's
columns first: the rows were sorted by group at load. ``core/layers/quantization/int4.py`` repacks AWQ and GPTQ
checkpoints into this layout.

Two launch shapes of one kernel, each program dequantizing a ``[block_k, block_n]`` tile (one group: block_k
divides the group size) and feeding ``tl.dot``:

- decode (M <= 16): x padded to 16 rows; output blocks narrow enough to give every SM work (``kernels/split_k.py``),
  and only for small layers the K loop split over programs (fp32 partial sums, added up by one ``sum``).
- prefill (larger M): ``[64, block_n]`` output tiles, no split.

``int4_linear_ref`` (unpack, dequantize, fp32 matmul) is the reference and the CPU path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.split_k import decode_launch

# AutoAWQ's GEMM packing: nibble i of an int32 holds column AWQ_ORDER[i] of its eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = tuple(4 * i for i in range(8))


def _nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """The eight 4-bit fields of each int32 as a new dim ``dim`` (nibble 0 first), int32 in 0..15."""
    shape = [1] * (packed.dim() + 1)
    shape[dim] = 8
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device).reshape(shape)
    return (packed.unsqueeze(dim) >> shifts) & 0xF


def unpack_int4_columns(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """``[R, C / 8]`` int32 packed along columns -> ``[R, C]``; ``order[i]``: the column nibble ``i`` holds (default
    sequential)."""
    nib = _nibbles(packed, 2)  # [R, C/8, 8]
    if order is not None:
        inverse = [order.index(j) for j in range(8)]
        nib = nib[..., inverse]
    return nib.reshape(packed.shape[0], -1)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """``[R / 8, C]`` int32 packed along rows (sequential nibbles) -> ``[R, C]``."""
    return _nibbles(packed, 1).reshape(-1, packed.shape[1])


def _to_int32_bits(value: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit patterns held in int64 -> the int32 with the same bits."""
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` values 0..15 -> ``[R / 8, C]`` int32, sequential nibbles along rows (the kernel's layout)."""
    rows, cols = q.shape
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=q.device).reshape(1, 8, 1)
    return _to_int32_bits((q.to(torch.int64).reshape(rows // 8, 8, cols) << shifts).sum(1))


def pack_int4_columns(q: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """``[R, C]`` values 0..15 -> ``[R, C / 8]`` int32; nibble ``i`` holds column ``order[i]`` of each eight."""
    rows, cols = q.shape
    grouped = q.to(torch.int64).reshape(rows, cols // 8, 8)
    if order is not None:
        grouped = grouped[..., list(order)]
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=q.device)
    return _to_int32_bits((grouped << shifts).sum(-1))


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
                    ) -> torch.Tensor:  # fmt: skip
    """The fp32 ``[K, N]`` weight of the kernel layout (rows in the permuted order, if any)."""
    q = unpack_int4_rows(qweight).float()
    groups = torch.arange(q.shape[0], device=q.device) // group_size
    return (q - zeros.float()[groups]) * scales.float()[groups]


def int4_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, perm: torch.Tensor | None = None, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:  # fmt: skip
    """Reference: dequantize the whole weight, fp32 matmul, x's dtype out."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).float()
    if perm is not None:
        x2 = x2[:, perm.long()]
    out = x2 @ dequantize_int4(qweight, scales, zeros, group_size)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


@triton.jit
def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, k_per_split, stride_xm, stride_om,
                      stride_os, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_packed = tl.arange(0, BLOCK_K // 8)
    m_mask = offs_m < M
    n_mask = offs_n < N
    shifts = tl.arange(0, 8) * 4
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
        # Each int32 is loaded once and split into its 8 rows: [BLOCK_K / 8, 8, BLOCK_N] -> [BLOCK_K, BLOCK_N].
        qw = tl.load(qw_ptr + (k0 // 8 + offs_packed)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        q = tl.reshape((qw[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N)).to(tl.float32)
        group = k0 // GROUP_SIZE
        s = tl.load(s_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w = (q * s[None, :] - (z * s)[None, :]).to(x.dtype)  # (q - z) * s as one FMA per element
        acc += tl.dot(x, w, out_dtype=tl.float32)
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _block_k(k: int, group_size: int, largest: int) -> int | None:
    """The largest block_k <= ``largest`` (16..128, a power of two) dividing both K and the group size."""
    block = largest
    while block >= 16:
        if k % block == 0 and group_size % block == 0:
            return block
        block //= 2
    return None


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              *, block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
              num_warps: int = 4) -> torch.Tensor:  # fmt: skip
    """The Triton kernel on a 2-D ``x [M, K]`` (contiguous rows): the decode shape for M <= 16, else prefill.
    Block sizes and ``split_k`` default to a per-shape choice; tests pass their own."""
    m, k = x.shape
    n = qweight.shape[1]
    decode = m <= 16
    block_m = 16 if decode else 64
    block_k = block_k or _block_k(k, group_size, 128 if decode else 64)
    if block_k is None or k % block_k or group_size % block_k:
        raise ValueError(f"int4_gemm: no block_k divides K={k} and the group size {group_size}.")
    k_blocks = k // block_k
    if decode and (block_n is None or split_k is None):
        auto_n, auto_split = decode_launch(n, k_blocks, x.device.index if x.is_cuda else None)
        block_n, split_k = block_n or auto_n, split_k or auto_split
    block_n = block_n or 128
    split_k = split_k or 1
    n_blocks, m_blocks = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    if split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        stride_os = 0
    else:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
        stride_os = out.stride(0)
    _int4_gemm_kernel[(n_blocks, m_blocks, split_k)](
        x, qweight, scales, zeros, out, m, n, k, k_per_split, x.stride(0), n, stride_os,
        GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return out if split_k == 1 else out.sum(0).to(x.dtype)


_TRITON_DTYPES = (torch.float16, torch.bfloat16)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                perm: torch.Tensor | None = None, bias: torch.Tensor | None = None, *, backend: str = "auto"
                ) -> torch.Tensor:  # fmt: skip
    """``x @ W (+ bias)``: the Triton kernel on CUDA (fp16/bf16), the reference otherwise."""
    k = x.shape[-1]
    if not (use_triton(x, backend) and x.dtype in _TRITON_DTYPES and _block_k(k, group_size, 128) is not None):
        return int4_linear_ref(x, qweight, scales, zeros, group_size, perm, bias)
    x2 = x.reshape(-1, k)
    x2 = x2[:, perm] if perm is not None else x2.contiguous()
    out = int4_gemm(x2, qweight, scales, zeros, group_size) if x2.shape[0] else x2.new_empty(0, qweight.shape[1])
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], qweight.shape[1])
