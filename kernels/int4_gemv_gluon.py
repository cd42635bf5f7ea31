"""Decode GEMMs over int4 weights (w4a16, AWQ / GPTQ in ``kernels/int4_gemm.py``'s layout, groups of a multiple of
128) for a few rows (M <= 8), written in Gluon: each thread loads exactly its own tensor-core fragments of the
weight, 16 bytes at a time, and dequantizes them in place.

Why: at M = 1 a GEMM is a pass over the weight. The Triton tensor-core kernel (``_int4_mma_kernel``) stages the
weight through shared memory for wgmma and is latency-bound at 24-30% of the H200's bandwidth (93.6 us per
Llama-8B layer against ~26 us of bytes; ``kernels/NOTES.md``). The fp8 Gluon GEMV (``kernels/fp8_gemv_gluon.py``)
showed the shape that reaches ~93% of a read-only kernel: registers only, many programs, warps splitting K, weight
loaded before the PDL wait. This is its int4 twin:

- **The kernel layout read as it is.** A 64-byte run of a weight row (``qweight [N, K / 8]`` int32) holds 128
  consecutive k: word ``4c + r`` (c < 4) nibble ``i`` is k ``32c + 4i + r``. Thread ``t`` (= lane % 4) of the mma
  quad loads the 16 bytes of block ``c = t`` of rows ``g`` and ``g + 8`` (``g`` = lane // 4): two 16-byte loads per
  128 k, and nothing moves between threads. ``TILED`` (``int4_gemm.tile_int4``, the engine's layout for all but qkv
  projections): the same runs with a program's 16 rows side by side, so its whole weight is one contiguous run
  (gate_up 26.6 -> 23.1 us).
- **Marlin's magic numbers, two weights per instruction.** A word's nibbles ``j`` and ``j + 4`` sit 16 bits apart,
  so ``lop3(word >> 4j, 0x000f000f, magic)`` is two fp16 ``1024 + q`` / bf16 ``128 + q`` at once (exact): 3 shifts
  and 4 ``lop3`` per 8 weights, no int -> float conversion, and no per-weight zero-point subtraction (below).
- **The K order relabelled.** The mma sums over k, so any order works if x follows it. Each 32-bit register the
  dequantization writes holds k and k + 16 of one row; the kernel names them ``k`` slots ``2t + h`` of the
  ``mma.sync.m16n8k16`` A fragment, and x's B fragment is read through the same map (x's values paired by a byte
  permute in registers). ``convert_layout(..., assert_trivial=True)``: no data moves between threads.
- **Zero points and scales after the product.** A 128-k chunk lies in one group (group sizes that are multiples of
  128), so each chunk's fp32 products are combined per row as ``s ((magic + q) @ x) - (magic + z) s (1 @ x)``: the
  second mma (an all-ones A operand) sums the chunk's x per token. Two FFMA per accumulator element; the weight is
  never rounded (``int4_linear_ref``'s numerics up to fp32 summation order).
- **Chunks as the mma's batch.** A program owns 16 weight rows; its ``warps x chunks`` 128-k chunks per loop step
  are the batch dimension of a 3-D ``mma_v2`` (chunk ``c``, warp ``w``: batch entry ``c * warps + w``), each with
  its own group's scales, added up once at the end.
- **A qkv epilogue** (:func:`gluon_int4_gemv_rope_cache`): the fp8 GEMV's rotary-pair rows and attention-prep
  epilogue (q rotated, k rotated and v into the paged cache), one launch fewer per layer.
- Measured on the H200 (Llama-8B, M = 1; RESULTS.md, twenty-first and twenty-second sessions): qkv 6.8 us, o 5.0,
  gate_up 23.1, down 13.3 (the last three tiled) against the Triton kernels' 11.0 / 8.0 / 54.8 / 19.1; W3-AWQ 279 ->
  436 -> 461 tok/s. ``kernels/int4_gemm.py`` picks it per shape (``INT4_GEMV_CONFIGS``). More steps of weight in
  flight per thread do not make it faster (kernels/NOTES.md).

Gluon has no interpreter: on the CPU the Triton kernels run; the GPU tests compare this kernel with
``int4_linear_ref``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from kernels.fp8_gemv_gluon import HAS_GLUON, MAX_M, ROWS  # the same mma.sync shape
from kernels.gemv_rows_gluon import rope_epilogue_args
from kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options, use_pdl

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from kernels.gemv_rows_gluon import _program_rows, _rope_cache_epilogue, _rope_inputs

CHUNK_K = 128  # k per chunk: 64 bytes of a weight row, 16 per thread of a quad
HALVES_PER_CHUNK = CHUNK_K // 4  # the chunk as int16 (four nibbles each)
_MAGIC_BITS = {torch.float16: 0x64006400, torch.bfloat16: 0x43004300}
_MAGIC_VALUES = {torch.float16: 1024.0, torch.bfloat16: 128.0}


class Int4GemvConfig(NamedTuple):
    """Warps per program, 128-k chunks per warp per loop step (each thread has 32 bytes of weight in flight per
    chunk), and how many loop steps of weight (0-2) a PDL-launched program loads before it waits on the kernel
    before it (whole steps only: :func:`preload_steps`)."""

    warps: int = 4
    chunks: int = 2
    preload: int = 1

    @property
    def step_k(self) -> int:
        """k of each weight row one loop step covers."""
        return self.warps * self.chunks * CHUNK_K


def _chunk_layout(warps: int, chunks: int, rows: int, per_thread: int):
    """A ``[chunks x warps, rows, 4 x per_thread]`` tile (batch entry ``c * warps + w``): thread ``lane`` holds
    ``per_thread`` contiguous elements at ``per_thread * (lane % 4)`` of row ``lane // 4`` (and ``+ 8`` when
    ``rows`` is 16) of each of its warp's chunks."""
    reg_bases = [[0, 0, 1 << i] for i in range(per_thread.bit_length() - 1)]
    if rows == 16:
        reg_bases.append([0, 8, 0])
    reg_bases += [[warps << i, 0, 0] for i in range(chunks.bit_length() - 1)]
    lane_bases = [[0, 0, per_thread], [0, 0, 2 * per_thread], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
    warp_bases = [[1 << i, 0, 0] for i in range(warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=reg_bases, lane_bases=lane_bases, warp_bases=warp_bases,
                                      block_bases=[], shape=[warps * chunks, rows, 4 * per_thread])


@functools.cache
def gemv_layouts(warps: int, chunks: int) -> tuple:
    """The weight tile's (int16, 8 per thread and row) and x tile's (32 values per thread) load layouts and the
    accumulator's (mma v2, the chunks as its batch)."""
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1, 1], instr_shape=[1, 16, 8])
    return (_chunk_layout(warps, chunks, ROWS, HALVES_PER_CHUNK // 4), _chunk_layout(warps, chunks, MAX_M, 32),
            mma)  # fmt: skip


def _magic_asm(magic_bits: int) -> str:
    """PTX: the four nibble pairs of one word (``$4``: int16 halves = nibbles 0-3 and 4-7) as half2s ``magic + q``
    ``$0 .. $3`` (nibbles ``j`` and ``j + 4``)."""
    lines = ["{", ".reg .b32 t;"]
    for j in range(4):
        src = "$4"
        if j:
            lines.append(f"shr.u32 t, $4, {4 * j};")
            src = "t"
        lines.append(f"lop3.b32 ${j}, {src}, 0x000f000f, {magic_bits:#010x}, 0xea;")
    return "\n".join(lines + ["}"])


_F16_ASM = triton.language.constexpr(_magic_asm(_MAGIC_BITS[torch.float16]))
_BF16_ASM = triton.language.constexpr(_magic_asm(_MAGIC_BITS[torch.bfloat16]))


if HAS_GLUON:
    @gluon.jit
    def _a_operand(halves, BATCH: gl.constexpr, MMA: gl.constexpr, DTYPE: gl.constexpr):
        """A loaded ``[batch, 16, 32]`` int16 tile (thread ``t``'s 8 halves: words ``r`` < 4 of block ``t``, low and
        high half ``h``) as the mma's A operand of ``magic + q`` (exact), its last dim relabelled to logical k
        ``32r + 16jj + 8hh + 2t + h`` for nibble ``j = 2jj + hh`` (physical k ``32t + 16h + 4j + r``)."""
        if DTYPE == gl.float16:
            w0, w1, w2, w3 = gl.inline_asm_elementwise(_F16_ASM, "=r,=r,=r,=r,r", [halves],
                                                       dtype=(gl.float16, gl.float16, gl.float16, gl.float16),
                                                       is_pure=True, pack=2)
        else:
            w0, w1, w2, w3 = gl.inline_asm_elementwise(_BF16_ASM, "=r,=r,=r,=r,r", [halves],
                                                       dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16),
                                                       is_pure=True, pack=2)
        w = gl.join(gl.join(w0, w2), gl.join(w1, w3))  # [.., 32, jj, hh]: nibble 2 jj + hh
        w = gl.permute(gl.reshape(w, [BATCH, 16, 4, 4, 2, 2, 2]), [0, 1, 3, 5, 6, 2, 4])  # [.., r, jj, hh, t, h]
        dot_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        return gl.convert_layout(gl.reshape(w, [BATCH, 16, 128]), dot_a, assert_trivial=True)

    @gluon.jit
    def _b_operand(xv, BATCH: gl.constexpr, MMA: gl.constexpr):
        """A loaded ``[batch, 8 tokens, 128]`` x tile (thread ``t``'s 32 values: physical k ``32t + 16h + 8jj +
        4hh + r``) as the mma's B operand in :func:`_a_operand`'s k order."""
        x = gl.permute(gl.reshape(xv, [BATCH, 8, 4, 2, 2, 2, 4]), [0, 1, 6, 4, 5, 2, 3])  # [.., r, jj, hh, t, h]
        dot_b: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
        return gl.convert_layout(gl.permute(gl.reshape(x, [BATCH, 8, 128]), [0, 2, 1]), dot_b, assert_trivial=True)

    @gluon.jit
    def _weight_step(w_ptrs, w_k, s_ptr, z_ptr, s_offs, k0: gl.constexpr, K: gl.constexpr,
                     GROUP_STRIDE: gl.constexpr, STEP_K: gl.constexpr, GROUP_SIZE: gl.constexpr,
                     TILED: gl.constexpr):  # fmt: skip
        """Asks for the loop step at ``k0``: its weight codes (int16, evict-first: read once per step) and each
        chunk's group scales and zero points as stored (``[batch, 16]``, the accumulator's layout; nothing waits on
        them here). Chunks past K load code 0 (and the last group's scales; their x is 0). ``s_offs``: ``(each
        chunk's first k at step 0, each row's offset)``, a group's scales ``GROUP_STRIDE`` apart. ``TILED``: a
        chunk of the program's 16 rows is 512 halves (``int4_gemm.tile_int4``), else a row's 128 k are 32."""
        at: gl.constexpr = k0 * 4 if TILED else k0 // 4
        if k0 + STEP_K <= K:
            halves = gl.load(w_ptrs + at, eviction_policy="evict_first")
        else:
            halves = gl.load(w_ptrs + at, mask=w_k + k0 < K, other=0, eviction_policy="evict_first")
        chunk_k, rows = s_offs
        group = (gl.minimum(k0 + chunk_k, K - 1) // GROUP_SIZE * GROUP_STRIDE)[:, None] + rows[None, :]
        return halves, gl.load(s_ptr + group), gl.load(z_ptr + group)

    @gluon.jit
    def _step_product(step, xv, acc, BATCH: gl.constexpr, MMA: gl.constexpr, DTYPE: gl.constexpr,
                      MAGIC: gl.constexpr):  # fmt: skip
        """``acc += (q - z) @ x^T * s`` over one loop step's chunks (``step``: :func:`_weight_step`), as ``s
        ((magic + q) @ x^T) - (magic + z) s (1 @ x^T)``: the second mma (an all-ones A operand, a constant) sums
        each chunk's x per token, so the zero point costs two FFMA per accumulator element instead of one packed
        subtraction per two weights."""
        halves, s_raw, z_raw = step
        s = s_raw.to(gl.float32)
        zs = -(MAGIC + z_raw.to(gl.float32)) * s
        a = _a_operand(halves, BATCH, MMA, DTYPE)
        b = _b_operand(xv, BATCH, MMA)
        ones = gl.full([BATCH, 16, 128], 1.0, DTYPE, layout=gl.DotOperandLayout(operand_index=0, parent=MMA,
                                                                                 k_width=2))
        zero = gl.zeros([BATCH, 16, 8], gl.float32, layout=MMA)
        return acc + mma_v2(a, b, zero) * s[:, :, None] + mma_v2(ones, b, zero) * zs[:, :, None]

    @gluon.jit
    def _int4_gemv_kernel(x_ptr, qh_ptr, s_ptr, z_ptr, out_ptr, M, stride_xm, stride_om, positions_ptr, cos_sin_ptr,
                          stride_cs, slot_ptr, k_cache_ptr, v_cache_ptr, stride_kcb, stride_kcs, stride_kch,
                          stride_vcb, stride_vcs, stride_vch, Q_ROWS, KV_ROWS, N: gl.constexpr, K: gl.constexpr,
                          stride_qn: gl.constexpr, WARPS: gl.constexpr, CHUNKS: gl.constexpr, W_TILE: gl.constexpr,
                          X_TILE: gl.constexpr, MMA: gl.constexpr, GROUP_SIZE: gl.constexpr, MAGIC: gl.constexpr,
                          PRELOAD: gl.constexpr, ROPE_CACHE: gl.constexpr, HEAD_DIM: gl.constexpr,
                          BLOCK_SIZE: gl.constexpr, USE_PDL: gl.constexpr, TILED: gl.constexpr = False):  # fmt: skip
        """Program ``pid``: ``out[:, 16 pid : 16 pid + 16] = x @ W[:, 16 pid : 16 pid + 16]``, ``W = (q - z) * s``.
        ``qh_ptr``: the kernel layout's qweight as int16 ``[N, K / 4]``; ``s``, ``z``: ``[K / GROUP_SIZE, N]``
        (``TILED``: both in ``int4_gemm.tile_int4``'s order, rows in plain order: never with ``ROPE_CACHE``).
        ``PRELOAD`` steps of weight (and their scales) are loaded before the PDL wait: no kernel writes them.
        The shape is compiled in (a model has a few): the K loop is unrolled, and every scale's address is a
        constant offset from the program's base (no group arithmetic in the loop). ``ROPE_CACHE``: a qkv GEMM whose
        epilogue is the attention prep (``gemv_rows_gluon._rope_cache_epilogue``: rows paired by rotary dims, q
        rotated into ``out_ptr`` ``[M, Q_ROWS]``, k and v into the paged cache); the arguments from ``positions_ptr``
        to ``KV_ROWS`` serve only it."""
        pid = gl.program_id(0)
        BATCH: gl.constexpr = WARPS * CHUNKS
        STEP_K: gl.constexpr = BATCH * 128
        DTYPE: gl.constexpr = x_ptr.dtype.element_ty
        PAIRED_ROWS = Q_ROWS + KV_ROWS if ROPE_CACHE else 0

        w_batch = gl.arange(0, BATCH, layout=gl.SliceLayout(1, gl.SliceLayout(2, W_TILE)))
        w_rows = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, W_TILE)))
        w_halves = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, W_TILE)))
        w_k = (w_batch * 128)[:, None, None] + (w_halves * 0)[None, None, :]  # each chunk's first k (K: whole chunks)
        if TILED:  # int4_gemm.tile_int4: the program's weight is [K / 128 chunks, 16 rows, 32 halves], contiguous
            w_ptrs = qh_ptr + pid.to(gl.int64) * (4 * K) + (w_rows * 32)[None, :, None] \
                + (w_batch * 512)[:, None, None] + w_halves[None, None, :]
        else:
            rows = gl.minimum(_program_rows(pid, w_rows, PAIRED_ROWS, HEAD_DIM), N - 1)  # tail rows re-read
            w_ptrs = qh_ptr + (rows.to(gl.int64) * stride_qn)[None, :, None] + (w_batch * 32)[:, None, None] \
                + w_halves[None, None, :]

        x_batch = gl.arange(0, BATCH, layout=gl.SliceLayout(1, gl.SliceLayout(2, X_TILE)))
        x_rows = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, X_TILE)))
        x_cols = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, X_TILE)))
        x_k = (x_batch * 128)[:, None, None] + x_cols[None, None, :]
        x_ptrs = x_ptr + (gl.minimum(x_rows, M - 1) * stride_xm)[None, :, None] + x_k  # padding rows: never stored

        s_batch = gl.arange(0, BATCH, layout=gl.SliceLayout(1, gl.SliceLayout(2, MMA)))
        o_rows = _program_rows(pid, gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(0, MMA))), PAIRED_ROWS,
                               HEAD_DIM)  # fmt: skip
        o_tokens = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, MMA)))
        s_tile_rows = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))
        if TILED:  # scales [N / 16, K / GROUP_SIZE, 16]
            s_offs = (s_batch * 128, pid * (16 * (K // GROUP_SIZE)) + s_tile_rows)
            GROUP_STRIDE: gl.constexpr = 16
        else:
            s_offs = (s_batch * 128, gl.minimum(_program_rows(pid, s_tile_rows, PAIRED_ROWS, HEAD_DIM), N - 1))
            GROUP_STRIDE: gl.constexpr = N

        if ROPE_CACHE:  # step inputs, written before the forward's first kernel: safe before the PDL wait
            slot, cos, sin = _rope_inputs(o_rows, o_tokens, M, positions_ptr, cos_sin_ptr, stride_cs, slot_ptr,
                                          HEAD_DIM)  # fmt: skip
        acc = gl.zeros([BATCH, 16, 8], gl.float32, layout=MMA)
        STEPS: gl.constexpr = (K + STEP_K - 1) // STEP_K
        # The K loop unrolled, step i + 1's weight and scales asked for before step i is multiplied (as fast as a
        # plain loop on the H200, but every scale address is a constant offset; asking for more steps ahead gained
        # nothing). PRELOAD (0-2, whole steps only) of them go out before the PDL wait: no kernel writes them.
        if PRELOAD > 0:
            cur = _weight_step(w_ptrs, w_k, s_ptr, z_ptr, s_offs, 0, K, GROUP_STRIDE, STEP_K, GROUP_SIZE, TILED)
        if PRELOAD > 1:
            nxt = _weight_step(w_ptrs, w_k, s_ptr, z_ptr, s_offs, STEP_K, K, GROUP_STRIDE, STEP_K, GROUP_SIZE, TILED)
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        if PRELOAD == 0:
            cur = _weight_step(w_ptrs, w_k, s_ptr, z_ptr, s_offs, 0, K, GROUP_STRIDE, STEP_K, GROUP_SIZE, TILED)
        for i in gl.static_range(STEPS):
            if i + 1 < STEPS and (i > 0 or PRELOAD < 2):
                nxt = _weight_step(w_ptrs, w_k, s_ptr, z_ptr, s_offs, (i + 1) * STEP_K, K, GROUP_STRIDE, STEP_K,
                                   GROUP_SIZE, TILED)  # fmt: skip
            if (i + 1) * STEP_K <= K:
                xv = gl.load(x_ptrs + i * STEP_K)
            else:  # chunks past K: x 0 (their codes are 0 too)
                xv = gl.load(x_ptrs + i * STEP_K, mask=x_k + i * STEP_K < K, other=0.0)
            acc = _step_product(cur, xv, acc, BATCH, MMA, DTYPE, MAGIC)
            if i + 1 < STEPS:
                cur = nxt

        out = gl.sum(acc, axis=0)  # [row, token]: the chunks' and warps' parts of K added up
        if ROPE_CACHE:
            _rope_cache_epilogue(out, o_rows, o_tokens, pid, M, out_ptr, stride_om, slot, cos, sin, k_cache_ptr,
                                 v_cache_ptr, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                                 Q_ROWS, KV_ROWS, HEAD_DIM, BLOCK_SIZE)
        else:
            gl.store(out_ptr + o_tokens[None, :] * stride_om + o_rows[:, None], out.to(out_ptr.dtype.element_ty),
                     mask=(o_rows < N)[:, None] & (o_tokens < M)[None, :])


def int4_gemv_supported(x: torch.Tensor, qweight: torch.Tensor, group_size: int) -> bool:
    """Whether :func:`gluon_int4_gemv` serves ``x @ W``: an NVIDIA GPU with bf16 mma.sync (compute capability 8+),
    fp16 / bf16 x of at most 8 rows with unit column stride, K a multiple of 128 and a group size that is (so each
    128-k chunk has one scale per row), and the weight's rows 16-byte aligned."""
    if x.dtype not in _MAGIC_VALUES:
        return False
    m, k = x.shape
    if m > MAX_M or k % CHUNK_K or group_size % CHUNK_K or x.stride(1) != 1:
        return False
    if qweight.stride(-1) != 1 or qweight.stride(0) % 4 or qweight.data_ptr() % 16:
        return False
    return gemv_device(x.device)


def gemv_device(device: torch.device | str) -> bool:
    """Whether the kernel runs on ``device`` at all: an NVIDIA GPU with bf16 mma.sync (compute capability 8+)."""
    return (HAS_GLUON and torch.device(device).type == "cuda" and torch.version.hip is None
            and _has_bf16_mma(device))  # fmt: skip


@functools.lru_cache(maxsize=None)
def _has_bf16_mma(device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def preload_steps(config: Int4GemvConfig, k: int, pdl: bool) -> int:
    """Steps of weight a program loads before its PDL wait: whole steps only (the peeled steps take no mask), none
    without PDL (nothing runs before a wait then)."""
    if not pdl or k % config.step_k:
        return 0
    return min(config.preload, k // config.step_k)


def gluon_int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, config: Int4GemvConfig | None = None, tiled: bool = False
                    ) -> torch.Tensor:  # fmt: skip
    """``x [M <= 8, K] @ W`` for the int4 kernel layout (``qweight [N, K / 8]``; ``scales``, ``zeros``
    ``[K / group, N]`` in x's dtype, whole-number zeros), ``tiled``: in ``int4_gemm.tile_int4``'s order (N a
    multiple of 16). Callers check :func:`int4_gemv_supported` first."""
    out = torch.empty((x.shape[0], qweight.shape[0]), dtype=x.dtype, device=x.device)
    if x.shape[0] and qweight.shape[0]:
        _launch(x, qweight, scales, zeros, group_size, out, config or Int4GemvConfig(), tiled=tiled)
    return out


def gluon_int4_gemv_rope_cache(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                               group_size: int, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                               k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, q_rows: int,
                               kv_rows: int, head_dim: int, config: Int4GemvConfig) -> torch.Tensor:  # fmt: skip
    """The qkv projection and ``attention_prep`` in one launch (the fp8 GEMV's ``gluon_fp8_gemv_rope_cache`` for
    int4 weights): returns q ``[M, q_rows]`` rotated, and writes k (rotated) and v into the paged caches at
    ``slot_mapping``. Callers check :func:`int4_gemv_supported` and ``rope_cache_supported``."""
    q = torch.empty((x.shape[0], q_rows), dtype=x.dtype, device=x.device)
    if x.shape[0]:
        rope = (positions, cos_sin_cache, slot_mapping, k_cache, v_cache, q_rows, kv_rows, head_dim)
        _launch(x, qweight, scales, zeros, group_size, q, config, rope)
    return q


def _launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
            out: torch.Tensor, config: Int4GemvConfig, rope: tuple | None = None, tiled: bool = False
            ) -> None:  # fmt: skip
    """One ``_int4_gemv_kernel`` launch over the weight's rows; ``rope``: the rotary epilogue's
    ``(positions, cos_sin, slot_mapping, k_cache, v_cache, q_rows, kv_rows, head_dim)``; ``tiled``: the weight in
    ``int4_gemm.tile_int4``'s order (no rope: its programs' rows are not rotary pairs)."""
    m, k = x.shape
    n = qweight.shape[0]
    halves = qweight.view(torch.int16)
    w_tile, x_tile, mma = gemv_layouts(config.warps, config.chunks)
    pdl = use_pdl(x)
    epilogue, head_dim, block_size = rope_epilogue_args(rope, out)
    _int4_gemv_kernel[(triton.cdiv(n, ROWS),)](
        x, halves, scales, zeros, out, m, x.stride(0), out.stride(0), *epilogue, N=n, K=k,
        stride_qn=halves.stride(0), WARPS=config.warps, CHUNKS=config.chunks, W_TILE=w_tile, X_TILE=x_tile, MMA=mma,
        GROUP_SIZE=group_size, MAGIC=_MAGIC_VALUES[x.dtype], PRELOAD=preload_steps(config, k, pdl),
        ROPE_CACHE=rope is not None, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, TILED=tiled, num_warps=config.warps,
        **launch_options(pdl),
    )  # fmt: skip

