"""Skinny GEMM for decode: ``out[M, N] = x[M, K] @ weight[N, K]^T (+ bias)`` for M of 1..16 rows.

At decode batch sizes a linear layer is one pass over its weight (2·M FLOPs per weight element: far under the
tensor cores' FLOP/byte), so its floor is weight bytes / HBM bandwidth, and what is lost on top of it is (a) too few
bytes in flight to cover the memory latency and (b) the fixed cost of each launch (ramp-up, tail). Both kernels read
every weight element exactly once, with 16-byte loads and no masks on the weight:

- ``fma`` (CUDA cores, M <= 4 per program): each program owns ``block_n`` weight rows and walks K in ``block_k``
  steps, loading tile t+1 into registers while it multiplies tile t (a register double buffer: loads in flight do
  not wait on the arithmetic), optionally also asking L2 for tile t+``prefetch`` (``prefetch.global.L2``: deeper
  pipelining without registers). One fp32 accumulator tile per x row, reduced across K once at the end. At M <= 4
  the FMAs use under a third of the CUDA cores' rate at full bandwidth.
- ``dot`` (tensor cores, x padded to 16 rows): ``tl.dot`` over ``[16, block_k] x [block_k, block_n]`` tiles, with
  Triton's cp.async pipeline (``num_stages``) keeping weight tiles in flight. For M of 5..16, where the FMA count
  would approach the CUDA cores' limit.

Rows past N (and x rows past M) re-read the last valid row instead of being masked, so the loads stay unmasked
vectors; only the stores are masked. Outputs are written in x's dtype or in float32 (the LM head's logits, which
saves the separate ``.float()`` pass over [M, vocab]).

With programmatic dependent launch on (``kernels/pdl.py``: the engine's ``enable_pdl``; ``pdl=`` overrides it per
call) a program may start while the previous kernel in the stream finishes, issues its first weight loads (weights
are never written by a kernel), and only then waits (``griddepcontrol.wait``) before it reads x or writes its output.

Launch configurations live in ``SKINNY_CONFIGS`` (exact ``(m_bucket, N, K)`` shapes, measured by
``benchmarks/bench_skinny_gemm.py``, which prints a block to paste here) and ``DEFAULT_CONFIGS`` (per M bucket, for
other shapes); a ``None`` entry sends that class to cuBLAS.

The dispatcher ``linear`` takes the caller's kernel backend (``"torch"``: always cuBLAS). Experiment switches, set by
the benchmark scripts through :func:`configure` (module settings, read at each call): ``enabled=False`` turns the
dispatcher off (always ``F.linear``); ``max_m`` is the largest M that takes the Triton path (default 16);
``forced_config`` (e.g. ``"fma:8x512:w4:p0"`` or ``"dot:32x128:w4:s4"``) forces one configuration for every shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import pdl as pdl_module
from kernels.backend import use_triton
from kernels.pdl import wait_then_release

# ------------------------------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class SkinnyConfig:
    """One launch configuration. ``kind`` is ``"fma"``, ``"dot"`` or ``"mma"`` / ``"mmq"`` (the fp8 W8A8
    tensor-core kernel, activations quantized by a separate launch / in the kernel; ``kernels/fp8_linear.py``; ``mma``
    and ``mms`` are also ``kernels/int4_gemm.py``'s w4a16 tensor-core kernel, scaling the weights / the products);
    ``prefetch`` (fma only) is how many tiles ahead each program asks L2 for (0: off); ``num_stages`` (the others)
    is Triton's software-pipeline depth; ``split_k`` (tensor-core kinds only, ``:k4``) fixes the K splits of the
    launch (0: ``kernels/split_k.py``'s rule), for shapes where a sweep measured more programs per SM to pay.
    ``msk`` is the fp8 W8A8 stream-K kernel (``kernels/fp8_stream_k.py``: one persistent launch of ``per_sm``
    programs per SM, ``:g2``, default 1, splitting the weight's tiles evenly). ``preload`` (fma only, ``:r8``) is how
    many tiles each program loads into registers before its PDL wait (``kernels/fp8_linear.py: fma_preload``)."""

    kind: str
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 1
    prefetch: int = 0
    split_k: int = 0
    per_sm: int = 0
    preload: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("fma", "dot", "mma", "mmq", "mms", "msk"):
            raise ValueError(f"kind must be 'fma', 'dot', 'mma', 'mmq', 'mms' or 'msk', got {self.kind!r}")
        for name in ("block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.kind in ("dot", "mma", "mmq", "mms", "msk") and (self.block_n < 16 or self.block_k < 16):
            raise ValueError(f"{self.kind} configs need block_n and block_k >= 16 (tl.dot's minimum)")
        if self.kind in ("mma", "mmq", "mms", "msk") and (self.block_n < 64 or self.block_k < 32):
            raise ValueError(f"{self.kind} configs need block_n >= 64 (one fp8 wgmma's M) and block_k >= 32 (its K)")
        if self.block_k < 8:
            raise ValueError("block_k must be >= 8 (one 16-byte vector of bf16)")
        if self.split_k < 0 or (self.split_k and self.kind not in ("mma", "mmq", "mms")):
            raise ValueError(f"split_k is a tensor-core config's (mma / mmq / mms) and >= 1, got {self}")
        if self.per_sm < 0 or (self.per_sm and self.kind != "msk"):
            raise ValueError(f"per_sm (programs per SM) is a stream-K (msk) config's and >= 1, got {self}")
        if self.preload < 1 or (self.preload > 1 and self.kind != "fma"):
            raise ValueError(f"preload (tiles loaded before the PDL wait) is an fma config's and >= 1, got {self}")

    def __str__(self) -> str:
        tail = f"p{self.prefetch}" if self.kind == "fma" else f"s{self.num_stages}"
        split = f":k{self.split_k}" if self.split_k else ""
        per_sm = f":g{self.per_sm}" if self.per_sm else ""
        preload = f":r{self.preload}" if self.preload > 1 else ""
        return f"{self.kind}:{self.block_n}x{self.block_k}:w{self.num_warps}:{tail}{split}{per_sm}{preload}"

    @classmethod
    def parse(cls, text: str) -> SkinnyConfig:
        """Inverse of ``str()``: ``fma:8x512:w4:p2``, ``dot:32x128:w4:s4`` (the last field may be left out) or
        ``mma:128x256:w4:s3:k2`` (a fixed K split) or ``msk:128x256:w4:s4:g2`` (programs per SM) or
        ``fma:32x256:w16:p0:r16`` (tiles loaded before the PDL wait)."""
        match = re.fullmatch(r"\s*(fma|dot|mma|mmq|mms|msk):(\d+)x(\d+):w(\d+)(?::([ps])(\d+))?(?::k(\d+))?"
                             r"(?::g(\d+))?(?::r(\d+))?\s*", text)
        if match is None:
            raise ValueError(f"cannot parse skinny GEMM config {text!r} (expected e.g. 'fma:8x512:w4:p0')")
        kind, bn, bk, warps, tag, value, split, per_sm, preload = match.groups()
        extra = {"split_k": int(split)} if split is not None else {}
        if per_sm is not None:
            extra["per_sm"] = int(per_sm)
        if preload is not None:
            extra["preload"] = int(preload)
        if tag is not None:
            if (tag == "p") != (kind == "fma"):
                raise ValueError(f"{text!r}: 'p' (prefetch) goes with fma, 's' (stages) with dot")
            extra |= {"prefetch": int(value)} if tag == "p" else {"num_stages": int(value)}
        return cls(kind, int(bn), int(bk), int(warps), **extra)


def _c(text: str) -> SkinnyConfig:
    return SkinnyConfig.parse(text)


# Exact shapes: (m_bucket, N, K) -> config, or None for cuBLAS. Paste the block printed by
# benchmarks/bench_skinny_gemm.py on the H100 here. Llama-3.1-8B: qkv (6144, 4096), o (4096, 4096),
# gate_up (28672, 4096), down (4096, 14336), LM head (128256, 4096).
# Measured on the H100 (2026-11-23, benchmarks/bench_skinny_gemm.py); unlisted shapes use DEFAULT_CONFIGS.
SKINNY_CONFIGS: dict[tuple[int, int, int], SkinnyConfig | None] = {
    (1, 6144, 4096): _c("fma:8x1024:w8:p0"),  # qkv_proj: Triton 19.7 us, cuBLAS 23.9 us
    (1, 4096, 4096): _c("fma:8x512:w4:p0"),  # o_proj: Triton 13.8 us, cuBLAS 16.1 us
    (1, 28672, 4096): _c("fma:4x1024:w4:p0"),  # gate_up_proj: Triton 80.1 us, cuBLAS 85.4 us
    (1, 4096, 14336): _c("fma:8x1024:w8:p0"),  # down_proj: Triton 42.8 us, cuBLAS 45.0 us
    (1, 128256, 4096): _c("fma:4x1024:w4:p0"),  # lm_head: Triton 335.2 us, cuBLAS 443.3 us
    (2, 6144, 4096): _c("fma:8x256:w4:p0"),  # qkv_proj: Triton 20.3 us, cuBLAS 21.4 us
    (2, 4096, 4096): _c("fma:8x512:w4:p0"),  # o_proj: Triton 14.2 us, cuBLAS 16.1 us
    (2, 28672, 4096): _c("fma:8x256:w4:p0"),  # gate_up_proj: Triton 83.0 us, cuBLAS 84.9 us
    (2, 4096, 14336): _c("fma:8x512:w4:p0"),  # down_proj: Triton 43.7 us, cuBLAS 44.9 us
    (2, 128256, 4096): _c("fma:8x512:w4:p0"),  # lm_head: Triton 345.2 us, cuBLAS 444.3 us
    (4, 6144, 4096): None,  # qkv_proj: Triton 22.1 us, cuBLAS 21.4 us
    (4, 4096, 4096): None,  # o_proj: Triton 15.8 us, cuBLAS 15.8 us
    (4, 28672, 4096): None,  # gate_up_proj: Triton 89.2 us, cuBLAS 85.2 us
    (4, 4096, 14336): None,  # down_proj: Triton 49.1 us, cuBLAS 45.0 us
    (4, 128256, 4096): _c("dot:32x128:w4:s4"),  # lm_head: Triton 362.8 us, cuBLAS 443.2 us
    (8, 6144, 4096): None,  # qkv_proj: Triton 21.4 us, cuBLAS 21.5 us
    (8, 4096, 4096): None,  # o_proj: Triton 16.3 us, cuBLAS 16.0 us
    (8, 28672, 4096): None,  # gate_up_proj: Triton 88.0 us, cuBLAS 85.7 us
    (8, 4096, 14336): None,  # down_proj: Triton 51.1 us, cuBLAS 45.2 us
    (8, 128256, 4096): _c("dot:32x256:w4:s3"),  # lm_head: Triton 356.8 us, cuBLAS 446.1 us
    (16, 6144, 4096): _c("dot:32x256:w4:s3"),  # qkv_proj: Triton 21.3 us, cuBLAS 21.9 us
    (16, 4096, 4096): _c("dot:16x128:w4:s6"),  # o_proj: Triton 15.0 us, cuBLAS 16.2 us
    (16, 28672, 4096): None,  # gate_up_proj: Triton 86.3 us, cuBLAS 86.0 us
    (16, 4096, 14336): _c("dot:16x256:w4:s4"),  # down_proj: Triton 45.2 us, cuBLAS 45.9 us
    (16, 128256, 4096): _c("dot:32x128:w4:s4"),  # lm_head: Triton 360.8 us, cuBLAS 454.7 us
}
DEFAULT_CONFIGS: dict[int, SkinnyConfig | None] = {
    1: _c("fma:8x1024:w8:p0"),  # geo-mean over layer shapes: fma:8x1024:w8:p0 31.3 us, cuBLAS 34.9 us
    2: _c("fma:8x512:w4:p0"),  # geo-mean over layer shapes: fma:8x512:w4:p0 32.6 us, cuBLAS 33.8 us
    4: None,  # geo-mean over layer shapes: fma:8x256:w4:p0 37.1 us, cuBLAS 33.7 us
    8: None,  # geo-mean over layer shapes: dot:32x256:w4:s3 35.7 us, cuBLAS 34.0 us
    16: _c("dot:16x256:w4:s4"),  # geo-mean over layer shapes: dot:16x256:w4:s4 33.9 us, cuBLAS 34.4 us
}


# Experiment switches (see the module docstring); change them with configure().
ENABLED = True
MAX_M = 16
FORCED_CONFIG: SkinnyConfig | None = None


def configure(
    *, enabled: bool | None = None, max_m: int | None = None, forced_config: str | SkinnyConfig | None = None,
) -> None:
    """Set the experiment switches that are given (the others keep their values); ``forced_config=""`` clears a
    forced configuration. Takes effect for launches made, and CUDA graphs captured, from now on."""
    global ENABLED, MAX_M, FORCED_CONFIG
    if enabled is not None:
        ENABLED = enabled
    if max_m is not None:
        MAX_M = max_m
    if forced_config is not None:
        if isinstance(forced_config, str):
            forced_config = SkinnyConfig.parse(forced_config) if forced_config else None
        FORCED_CONFIG = forced_config


def m_bucket(m: int) -> int:
    """The decode graphs' buckets 1, 2, 4, 8, 16 (and powers of two past them)."""
    return 1 << max(0, (m - 1).bit_length())


def pick_config(m: int, n: int, k: int) -> SkinnyConfig | None:
    """The configuration for this shape, or None when cuBLAS should run it."""
    if FORCED_CONFIG is not None:
        return FORCED_CONFIG
    bucket = m_bucket(m)
    key = (bucket, n, k)
    if key in SKINNY_CONFIGS:
        return SKINNY_CONFIGS[key]
    return DEFAULT_CONFIGS.get(bucket)


# ------------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the lines holding ``ptrs`` (a hint: no registers, nothing to wait on)."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def prefetch_two_tiles(w_ptr, w_rows, k_start, k_end, BLOCK_K: tl.constexpr, PF_COLS: tl.constexpr):
    """Ask L2 for the first two ``BLOCK_K`` tiles of ``[k_start, k_end)`` in the weight rows at offsets ``w_rows``
    (``PF_COLS`` addresses per row: one per 128-byte line): what a PDL-launched GEMM does before it waits on the
    previous kernel, since no kernel writes a weight."""
    l2_ptrs = w_ptr + w_rows[:, None] + (tl.arange(0, PF_COLS) * (BLOCK_K // PF_COLS))[None, :]
    _prefetch_l2(l2_ptrs + k_start)
    _prefetch_l2(l2_ptrs + tl.minimum(k_start + BLOCK_K, k_end - 1))


@triton.jit
def _load_w_tile(w_ptrs, k0, K, offs_k, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(w_ptrs + k0, eviction_policy="evict_first")
    return tl.load(w_ptrs + k0, mask=(k0 + offs_k < K)[None, :], other=0.0, eviction_policy="evict_first")


@triton.jit
def _load_x_row(x_row_ptr, k0, K, offs_k, row_zeros, EVEN_K: tl.constexpr):
    """x[m, k0:k0+BLOCK_K] broadcast to the weight tile's [BLOCK_N, BLOCK_K] shape. Loading it at that shape (each
    thread re-reads its K slice for each of its rows, from L1) gives it the weight tile's register layout; a 1-D
    load would get its own layout and cost a shared-memory layout conversion (and two barriers) every tile."""
    ptrs = x_row_ptr + k0 + row_zeros[:, None] + offs_k[None, :]
    if EVEN_K:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=(k0 + offs_k < K)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _x_row_ptrs(x_ptr, m0, M, stride_xm):
    """The rows m0..m0+3 of x for an fma program of up to four rows; rows past M repeat the last row (their sums are
    never stored), so every load stays in bounds without a mask."""
    last = M - 1
    return (x_ptr + tl.minimum(m0, last).to(tl.int64) * stride_xm,
            x_ptr + tl.minimum(m0 + 1, last).to(tl.int64) * stride_xm,
            x_ptr + tl.minimum(m0 + 2, last).to(tl.int64) * stride_xm,
            x_ptr + tl.minimum(m0 + 3, last).to(tl.int64) * stride_xm)


@triton.jit
def _fma_tile(acc0, acc1, acc2, acc3, w, x0_ptr, x1_ptr, x2_ptr, x3_ptr, k0, K, offs_k, row_zeros,
              BLOCK_M: tl.constexpr, EVEN_K: tl.constexpr):  # fmt: skip
    """acc_i += w * x_i over one [BLOCK_N, BLOCK_K] tile, for the program's BLOCK_M (1, 2 or 4) x rows."""
    wf = w.to(tl.float32)
    acc0 += wf * _load_x_row(x0_ptr, k0, K, offs_k, row_zeros, EVEN_K)
    if BLOCK_M > 1:
        acc1 += wf * _load_x_row(x1_ptr, k0, K, offs_k, row_zeros, EVEN_K)
    if BLOCK_M > 2:
        acc2 += wf * _load_x_row(x2_ptr, k0, K, offs_k, row_zeros, EVEN_K)
        acc3 += wf * _load_x_row(x3_ptr, k0, K, offs_k, row_zeros, EVEN_K)
    return acc0, acc1, acc2, acc3


@triton.jit
def _store_row(out_ptr, m, M, stride_om, acc, bias, rows, N, HAS_BIAS: tl.constexpr):
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += bias
    n_valid = tl.where(m < M, N, 0)  # (rows < N) & (m < M), written so that the interpreter takes it too
    tl.store(out_ptr + m * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=rows < n_valid)


@triton.jit
def _store_rows(out_ptr, m0, M, stride_om, acc0, acc1, acc2, acc3, bias, rows, N, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr):  # fmt: skip
    """An fma program's ``BLOCK_M`` (1, 2 or 4) output rows from ``m0``: each accumulator reduced over K and stored."""
    _store_row(out_ptr, m0, M, stride_om, acc0, bias, rows, N, HAS_BIAS)
    if BLOCK_M > 1:
        _store_row(out_ptr, m0 + 1, M, stride_om, acc1, bias, rows, N, HAS_BIAS)
    if BLOCK_M > 2:
        _store_row(out_ptr, m0 + 2, M, stride_om, acc2, bias, rows, N, HAS_BIAS)
        _store_row(out_ptr, m0 + 3, M, stride_om, acc3, bias, rows, N, HAS_BIAS)


@triton.jit
def _skinny_fma_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr,
    PF_COLS: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """Program (n, m) computes out[m*BLOCK_M : +BLOCK_M, n*BLOCK_N : +BLOCK_N] on the CUDA cores."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = tl.minimum(rows, N - 1).to(tl.int64) * stride_wn
    w_ptrs = w_ptr + w_rows[:, None] + offs_k[None, :]
    num_tiles = tl.cdiv(K, BLOCK_K)
    if PREFETCH > 0:  # PF_COLS addresses per tile row: one per 128-byte line
        l2_ptrs = w_ptr + w_rows[:, None] + (tl.arange(0, PF_COLS) * (BLOCK_K // PF_COLS))[None, :]
        for t in tl.static_range(PREFETCH):
            _prefetch_l2(l2_ptrs + tl.minimum(t, num_tiles - 1) * BLOCK_K)

    w = _load_w_tile(w_ptrs, 0, K, offs_k, EVEN_K)
    wait_then_release(USE_PDL)  # everything above touched only the weight; x and out may be the previous kernel's

    m0 = tl.program_id(1) * BLOCK_M
    x0_ptr, x1_ptr, x2_ptr, x3_ptr = _x_row_ptrs(x_ptr, m0, M, stride_xm)
    row_zeros = tl.zeros([BLOCK_N], dtype=tl.int32)
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for t in range(1, num_tiles):
        if PREFETCH > 0:
            _prefetch_l2(l2_ptrs + tl.minimum(t + PREFETCH - 1, num_tiles - 1) * BLOCK_K)
        w_next = _load_w_tile(w_ptrs, t * BLOCK_K, K, offs_k, EVEN_K)
        acc0, acc1, acc2, acc3 = _fma_tile(acc0, acc1, acc2, acc3, w, x0_ptr, x1_ptr, x2_ptr, x3_ptr,
                                           (t - 1) * BLOCK_K, K, offs_k, row_zeros, BLOCK_M, EVEN_K)  # fmt: skip
        w = w_next
    acc0, acc1, acc2, acc3 = _fma_tile(acc0, acc1, acc2, acc3, w, x0_ptr, x1_ptr, x2_ptr, x3_ptr,
                                       (num_tiles - 1) * BLOCK_K, K, offs_k, row_zeros, BLOCK_M, EVEN_K)  # fmt: skip

    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    _store_rows(out_ptr, m0, M, stride_om, acc0, acc1, acc2, acc3, bias, rows, N, HAS_BIAS, BLOCK_M)


@triton.jit
def _skinny_dot_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PF_COLS: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (n, m) computes out[m*BLOCK_M : +BLOCK_M, n*BLOCK_N : +BLOCK_N] on the tensor cores."""
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + (tl.minimum(rows_n, N - 1).to(tl.int64) * stride_wn)[:, None] + offs_k[None, :]
    x_ptrs = x_ptr + (tl.minimum(rows_m, M - 1).to(tl.int64) * stride_xm)[:, None] + offs_k[None, :]
    if USE_PDL:
        prefetch_two_tiles(w_ptr, tl.minimum(rows_n, N - 1).to(tl.int64) * stride_wn, 0, K, BLOCK_K, PF_COLS)
    wait_then_release(USE_PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
            x = tl.load(x_ptrs + k0)
        else:
            k_mask = (k0 + offs_k < K)[None, :]
            w = tl.load(w_ptrs + k0, mask=k_mask, other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs + k0, mask=k_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=rows_n < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows_m.to(tl.int64)[:, None] * stride_om + rows_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows_m < M)[:, None] & (rows_n < N)[None, :])


# ------------------------------------------------------------------------------------------------------ launchers


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    config: SkinnyConfig | None = None,
    pdl: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton path, for any M (each program covers 1-4 rows (fma) or 16 rows (dot) of x; past 16 rows the weight
    is re-read, so the dispatcher sends those to cuBLAS). ``x``'s last dim must be K; rows may be strided. ``out``
    (optional): an ``[M, N]`` tensor with unit column stride to write into; its dtype is the output dtype."""
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    lead = x.shape[:-1]
    rows = x if x.dim() == 2 else x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    m = rows.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    elif out.shape != (m, n) or out.stride(1) != 1 or (out_dtype is not None and out.dtype != out_dtype):
        raise ValueError(f"out must be [{m}, {n}] with unit column stride (got {tuple(out.shape)}, {out.stride()})")
    if m == 0 or n == 0:
        return out.view(*lead, n)
    if k == 0:
        return out.zero_().add_(bias if bias is not None else 0).view(*lead, n)
    if config is None:
        config = pick_config(m, n, k) or DEFAULT_CONFIGS[16] or _c("dot:32x128:w4:s4")
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    pdl = pdl_module.use_pdl(x) if pdl is None else (bool(pdl) and pdl_module.can_use_pdl(x))
    pdl_args = pdl_module.launch_options(pdl)  # USE_PDL and the launch keyword
    bias_arg = bias if bias is not None else weight  # never read without HAS_BIAS
    even_k = k % config.block_k == 0
    pf_cols = max(1, config.block_k * weight.element_size() // 128)  # L2 prefetch: one address per 128-byte line
    if config.kind == "fma":
        block_m = min(4, m_bucket(m))
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, block_m))
        _skinny_fma_kernel[grid](
            rows, weight, bias_arg, out, m, n, k, rows.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            PREFETCH=config.prefetch if x.is_cuda else 0, PF_COLS=pf_cols, EVEN_K=even_k,
            num_warps=config.num_warps, num_stages=1, **pdl_args,
        )  # fmt: skip
    else:
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, 16))
        _skinny_dot_kernel[grid](
            rows, weight, bias_arg, out, m, n, k, rows.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            PF_COLS=pf_cols, EVEN_K=even_k, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl_args,
        )  # fmt: skip
    return out.view(*lead, n)


# ----------------------------------------------------------------------------------------------------- dispatcher


def linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """cuBLAS (``F.linear``), then a cast when another output dtype is asked for."""
    out = F.linear(x, weight, bias)
    return out if out_dtype is None or out.dtype == out_dtype else out.to(out_dtype)


_TRITON_DTYPES = (torch.float16, torch.bfloat16)


def _supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype | None) -> bool:
    return (
        x.dtype in _TRITON_DTYPES
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.stride(1) == 1
        and (bias is None or (bias.dim() == 1 and bias.dtype in (x.dtype, torch.float32)))
        and (out_dtype is None or out_dtype == x.dtype or out_dtype == torch.float32)
    )


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
    *, backend: str = "auto",
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in ``out_dtype`` (default x's dtype). On CUDA with at most ``MAX_M`` rows the
    Triton skinny GEMM runs (when the shape's config is not None and ``backend`` is not "torch"); otherwise cuBLAS,
    unchanged."""
    if ENABLED and use_triton(x, backend):
        k = x.shape[-1]
        m = x.numel() // k if k else 0
        if 0 < m <= MAX_M and _supported(x, weight, bias, out_dtype):
            config = pick_config(m, weight.shape[0], k)
            if config is not None:
                return skinny_gemm(x, weight, bias, out_dtype, config=config)
    return linear_ref(x, weight, bias, out_dtype)
