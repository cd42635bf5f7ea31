"""Fused mixture-of-experts MLP: ``out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))`` over the top-k
experts ``e = ids[t, j]`` of each token.

Steps of the Triton path (all on the device, no host sync, shapes fixed by the token count: CUDA-graph safe):

1. ``fused_topk``: softmax over all router logits in float32, top-k, optional renormalisation of the k weights
   (Mixtral's "softmax over the top-k logits" is softmax-all + renormalise; Qwen's ``norm_topk_prob`` flag).
2. ``moe_align_block_size``: the T*k (token, slot) pairs sorted by expert (stable), each expert's run padded to a
   multiple of ``BLOCK_M`` with a sentinel pair id, into a buffer of the static upper bound
   ``T*k + E*(BLOCK_M - 1)`` rows; plus the expert of each ``BLOCK_M`` block and the padded total (a device scalar
   the GEMMs read to skip the unused tail blocks).
3. One grouped GEMM launch for gate|up (each block of sorted pairs multiplies its expert's ``w13[e]``), the SiLU-and-mul
   kernel right after, one grouped GEMM for down that scales each row by its routing weight, then the top-k sum
   (a reduction over the k rows of each token).

Weights: ``w13 [E, 2*I, H]`` (gate rows then up rows, the layout of HF's per-expert ``nn.Linear``s stacked) and
``w2 [E, H, I]``, in the activations' dtype, or quantized (:class:`ExpertQuant`: e4m3 with scales per channel or
per block, int4 with group scales and zero points, 8-bit codes with group scales, GGUF blocks, bitsandbytes 4-bit
codes), which the kernels widen tile by tile in registers. Launch configurations by shape live in
``fused_moe_configs.json`` beside this file (filled by ``benchmarks/tune_fused_moe.py`` on the GPU); shapes not in it
take ``default_config``, which are untuned defaults.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.activation import silu_and_mul_triton
from kernels.backend import use_triton
from kernels.codes_gemv import load_codebook, look_up, step_scales
from kernels.gguf_gemm import GGUF_KERNEL_TYPES
from kernels.gguf_gemm import _decode as _gguf_decode
from kernels.int4_gemm import _MAGIC_VALUES, _TRITON_DTYPES, KERNEL_K_BLOCK, _dequant_halves

CONFIG_FILE = Path(__file__).with_name("fused_moe_configs.json")


# ---------------------------------------------------------------------------------------------------- routing


def fused_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k] int32): softmax over all experts in float32, the k largest,
    divided by their sum when ``renormalize``."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


# ---------------------------------------------------------------------------------------------------- reference


class ExpertQuant(NamedTuple):
    """How quantized experts are stored, beside ``w13`` / ``w2``: e4m3 weights with fp32 scales per expert and output
    channel (``[E, N]``) or per ``block`` (``[E, N / block_n, K / block_k]``); or (``w13_group`` / ``w2_group``, the
    group sizes along each GEMM's K) int4 codes in ``kernels/int4_gemm.py``'s kernel layout (``[E, N, K / 8]`` int32)
    with scales and zero points ``[E, K / group, N]`` (``w13_zeros`` / ``w2_zeros``: ``W = (q - z) s``) or offsets
    (``w13_offsets`` / ``w2_offsets``: ``W = q s + o``, GGUF Q4_0 / Q4_1 / Q4_K experts repacked at load), and for
    GPTQ act-order experts each expert's input rows sorted by group: ``x[:, perm[e]]`` times its weight
    (``w13_perm`` / ``w2_perm``); GGUF experts in their GGML blocks (``w13_ggml`` / ``w2_ggml``: ``[E, N,
    row_bytes]`` uint8, the file's bytes); or bitsandbytes 4-bit experts (``[E, N, K / 2]`` codes two a byte,
    ``w13_scale`` / ``w2_scale`` the absmax of each ``bnb_block`` weights ``[E, N, K / bnb_block]``, ``codebook``).
    int4 and GGUF blocks are chosen per stack (``ggml_type``, ``parts``): a Q4_K_M file's gate / up repacked to int4
    beside its down kept in Q6_K blocks. Or (``w13_int8`` / ``w2_int8``) 8-bit codes ``[E, N, K]`` (int8, or uint8)
    with scales ``[E, K / group, N]`` (fp32 or the activations' dtype; group = K: one per channel) and optional
    offsets, ``W = q * s + o``: GGUF Q8_0 / Q6_K / Q5_K stacks repacked at load, GPTQ 8-bit (act order too, its
    ``perm``) and bitsandbytes 8-bit experts (``_moe_int8_kernel``). All run on the 16-bit tensor cores after
    widening the weight in registers."""

    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    block: tuple[int, int] | None = None
    w13_zeros: torch.Tensor | None = None
    w2_zeros: torch.Tensor | None = None
    w13_group: int = 0
    w2_group: int = 0
    w13_perm: torch.Tensor | None = None  # act order: each expert's int4 / 8-bit rows sorted by group, [E, K] int32
    w2_perm: torch.Tensor | None = None
    w13_ggml: int = 0  # GGUF experts kept in their blocks: each stack's GGML type (kernels/gguf_gemm.py)
    w2_ggml: int = 0
    codebook: torch.Tensor | None = None  # bitsandbytes 4-bit: the 16 code values; the scales are block absmax
    bnb_block: int = 0
    w13_offsets: torch.Tensor | None = None  # int4 with offsets in place of zero points: W = q * s + o (GGUF)
    w2_offsets: torch.Tensor | None = None
    w13_int8: bool = False  # 8-bit codes [E, N, K] (int8 / uint8) with {w13,w2}_scale / _offsets / _group
    w2_int8: bool = False
    w13_row_scale: torch.Tensor | None = None  # 4-bit codebook experts: a scale per output row [E, N] (NVFP4's
    w2_row_scale: torch.Tensor | None = None  # global scales; the block scales then fp8)

    @property
    def int4(self) -> bool:
        """Some stack is int4."""
        return (self.w13_group > 0 and not self.w13_int8) or (self.w2_group > 0 and not self.w2_int8)

    def int8_stack(self, which: int) -> bool:
        """``w13`` (0) or ``w2`` (1) holds 8-bit codes (``_moe_int8_kernel``)."""
        return self.w13_int8 if which == 0 else self.w2_int8

    @property
    def gguf(self) -> bool:
        """Some stack is in GGUF blocks."""
        return self.w13_ggml > 0 or self.w2_ggml > 0

    def ggml_type(self, which: int) -> int:
        """The GGML type of ``w13`` (0) or ``w2`` (1) kept in its blocks, or 0."""
        return self.w13_ggml if which == 0 else self.w2_ggml

    def offsets(self, which: int) -> torch.Tensor | None:
        """The int4 offsets of ``w13`` (0) or ``w2`` (1), where it has them instead of zero points."""
        return self.w13_offsets if which == 0 else self.w2_offsets

    @property
    def bnb4(self) -> bool:
        return self.bnb_block > 0

    def row_scale(self, which: int) -> torch.Tensor | None:
        """The 4-bit codebook experts' per-row scales of ``w13`` (0) or ``w2`` (1), or None."""
        return self.w13_row_scale if which == 0 else self.w2_row_scale

    def parts(self, which: int) -> tuple[torch.Tensor, torch.Tensor | None, int, torch.Tensor | None]:
        """(scales, zero points, int4 group size, act-order permutations) of ``w13`` (0) or ``w2`` (1)."""
        if which == 0:
            return self.w13_scale, self.w13_zeros, self.w13_group, self.w13_perm
        return self.w2_scale, self.w2_zeros, self.w2_group, self.w2_perm


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, quant: ExpertQuant | None = None) -> torch.Tensor:  # fmt: skip
    """Plain torch, one expert at a time (syncs with the host: ``nonzero``); the result in ``x``'s dtype. Quantized
    experts (``quant``): fp8 per channel widened to x's dtype with the products scaled, as the kernel does; fp8
    blocks, int4 (act order: x's columns permuted), GGUF blocks and bitsandbytes codes dequantized first."""
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for expert in range(w13.shape[0]):
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        gate_up = _expert_product(x[tokens], w13, quant, 0, expert)
        hidden = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = _expert_product(hidden, w2, quant, 1, expert).float()
        out.index_add_(0, tokens, y * topk_weights[tokens, slots, None].float())
    return out.to(x.dtype)


def _expert_product(x: torch.Tensor, w: torch.Tensor, quant: ExpertQuant | None, which: int,
                    expert: int) -> torch.Tensor:  # fmt: skip
    """``x @ w[expert]^T`` for one expert's 16-bit, fp8, int4, GGUF or bitsandbytes weight (``which``: w13 or
    w2)."""
    if quant is None:
        return x @ w[expert].t()
    if quant.bnb4:
        from kernels.bnb4_gemm import dequantize_bnb4

        absmax, rows = (quant.w13_scale if which == 0 else quant.w2_scale)[expert], quant.row_scale(which)
        weight = dequantize_bnb4(w[expert], absmax, quant.codebook, quant.bnb_block,
                                 None if rows is None else rows[expert])
        return x @ weight.to(x.dtype).t()
    if quant.ggml_type(which):
        from kernels.gguf_gemm import dequantize_gguf

        return x @ dequantize_gguf(w[expert], quant.ggml_type(which), x.shape[1]).to(x.dtype).t()
    scale, zeros, group, perm = quant.parts(which)
    x = x if perm is None else x[:, perm[expert].long()]  # act order: the expert's rows sorted by group
    if quant.int8_stack(which):
        offsets = quant.offsets(which)
        offsets = None if offsets is None else offsets[expert]
        return x @ dequantize_int8_experts(w[expert], scale[expert], offsets, group).to(x.dtype).t()
    if group:
        from kernels.int4_gemm import dequantize_int4, dequantize_int4_offsets

        offsets = quant.offsets(which)
        if offsets is not None:
            return x @ dequantize_int4_offsets(w[expert], scale[expert], offsets[expert], group).to(x.dtype)
        return x @ dequantize_int4(w[expert], scale[expert], zeros[expert], group).to(x.dtype)
    if quant.block is not None:
        from kernels.fp8_block_gemm import dequantize_fp8_blocks

        return x @ dequantize_fp8_blocks(w[expert], scale[expert], quant.block).to(x.dtype).t()
    product = x @ w[expert].to(x.dtype).t()
    return (product.float() * scale[expert].float()).to(product.dtype)


def dequantize_int8_experts(q: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor | None,
                            group: int) -> torch.Tensor:  # fmt: skip
    """One expert's 8-bit weight ``[N, K]`` from its codes ``q [N, K]``, scales (and offsets) ``[K / group, N]``:
    ``q * s + o`` in the scales' dtype, one rounding per weight (the kernel's fused multiply-add)."""
    s = scale.t().repeat_interleave(group, dim=1)
    w = q.to(s.dtype) * s
    if offsets is None:
        return w
    return w + offsets.t().repeat_interleave(group, dim=1).to(s.dtype)


# ---------------------------------------------------------------------------------------------------- align


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Sort the (token, slot) pairs by expert and pad each expert's run to a multiple of ``block_m``, with torch ops
    that never wait on the host (no ``bincount``/``nonzero``/``.item()``; every shape depends only on T).

    Returns ``sorted_pair_ids [T*k + E*(block_m-1)]`` (pair index ``t*k + j``, or ``T*k`` for padding),
    ``block_experts [num_blocks]`` (the expert of each ``block_m`` block; blocks past the padded total hold the last
    expert and are skipped) and ``num_padded [1]`` (the padded total, read by the GEMMs)."""
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded_counts, 0)
    padded_starts = padded_ends - padded_counts
    starts = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=device) - starts[sorted_experts]
    capacity = num_pairs + num_experts * (block_m - 1)
    sorted_pair_ids = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, padded_starts[sorted_experts] + rank, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_experts = torch.searchsorted(padded_ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_pair_ids, block_experts.to(torch.int32), padded_ends[-1:].to(torch.int32)


# ---------------------------------------------------------------------------------------------------- grouped GEMM


# What the grouped GEMM's ``b`` holds (``B_KIND``)
B_PLAIN, B_FP8_CHANNEL, B_FP8_BLOCK = 0, 1, 2


@triton.jit
def _block_of_pairs(sorted_pair_ids_ptr, block_experts_ptr, num_padded_ptr, N, num_pairs, capacity,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """This program's ``BLOCK_M`` run of sorted pairs and ``BLOCK_N`` output columns: ``(live, pair, valid,
    expert, offs_n)``; ``live`` is False past the padded total (the program has nothing to do). Grouped ordering:
    ``GROUP_M`` row blocks walk the N tiles together (reuse of the expert's weight tiles in L2)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(capacity, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    live = pid_m * BLOCK_M < tl.load(num_padded_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # the buffer need not end on a whole block: the last is masked
    pair = tl.load(sorted_pair_ids_ptr + offs_m, mask=offs_m < capacity, other=num_pairs).to(tl.int64)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    return live, pair, pair < num_pairs, expert, pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _pair_a_rows(a_ptr, pair, stride_am, stride_ak, PAIRS_PER_A_ROW: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(offs_k, pointers)`` to the first K step of each pair's activation row ``[BLOCK_M, BLOCK_K]``."""
    offs_k = tl.arange(0, BLOCK_K)
    return offs_k, a_ptr + (pair // PAIRS_PER_A_ROW)[:, None] * stride_am + offs_k[None, :] * stride_ak


@triton.jit
def _store_pair_rows(acc, c_ptr, weights_ptr, pair, valid, offs_n, N, stride_cm, stride_cn,
                     MUL_ROUTING_WEIGHT: tl.constexpr):  # fmt: skip
    """``acc [BLOCK_M, BLOCK_N]`` (times each pair's routing weight) into the pairs' rows of ``c``."""
    if MUL_ROUTING_WEIGHT:
        acc = acc * tl.load(weights_ptr + pair, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n < N)[None, :])


@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_pair_ids_ptr, block_experts_ptr, num_padded_ptr, s_ptr,
    N, K, num_pairs, capacity,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_se, stride_s1,
    PAIRS_PER_A_ROW: tl.constexpr, MUL_ROUTING_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    B_KIND: tl.constexpr = 0, SCALE_N: tl.constexpr = 0, SCALE_K: tl.constexpr = 0,
):  # fmt: skip
    """``c[pair, :] = a[pair // PAIRS_PER_A_ROW, :] @ b[expert]^T`` (times the pair's routing weight) for every
    ``BLOCK_M`` run of sorted pairs, which all share one expert; padding rows are masked out. ``B_KIND``
    (:class:`ExpertQuant`): e4m3 ``b`` widened to a's dtype in registers, the product scaled by ``s [expert, n]``
    after the K loop (``B_FP8_CHANNEL``) or each K step's partial product by ``s [expert, n // SCALE_N,
    k // SCALE_K]`` (``B_FP8_BLOCK``; ``BLOCK_K`` divides ``SCALE_K``). int4 experts: :func:`_moe_int4_kernel`."""
    live, pair, valid, expert, offs_n = _block_of_pairs(sorted_pair_ids_ptr, block_experts_ptr, num_padded_ptr, N,
                                                        num_pairs, capacity, BLOCK_M, BLOCK_N, GROUP_M)
    if not live:
        return
    n_live = offs_n < N
    offs_k, a_ptrs = _pair_a_rows(a_ptr, pair, stride_am, stride_ak, PAIRS_PER_A_ROW, BLOCK_K)
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    s_ptrs = s_ptr + expert * stride_se + offs_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & n_live[None, :], other=0.0)
        if B_KIND != 0:
            b = b.to(a.dtype)
        if B_KIND == 2:
            block_scale = tl.load(s_ptr + expert * stride_se + (offs_n // SCALE_N) * stride_s1
                                  + (k * BLOCK_K) // SCALE_K, mask=n_live, other=0.0)  # fmt: skip
            acc += tl.dot(a, b, input_precision=DOT_PRECISION) * block_scale[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if B_KIND == 1:
        acc = acc * tl.load(s_ptrs, mask=n_live, other=0.0)[None, :]
    _store_pair_rows(acc, c_ptr, weights_ptr, pair, valid, offs_n, N, stride_cm, stride_cn, MUL_ROUTING_WEIGHT)


@triton.jit
def _per_int16(values, BLOCK_N: tl.constexpr, HALVES: tl.constexpr, GROUPS: tl.constexpr, ONE_GROUP: tl.constexpr):
    """A step's per-row (``[BLOCK_N, 1]``, ``ONE_GROUP``) or per-group (``[BLOCK_N, GROUPS]``) values repeated over
    the int16 of the halves tile ``[BLOCK_N, HALVES]`` they apply to (a group's ``HALVES / GROUPS`` consecutive ones),
    in registers."""
    if ONE_GROUP:
        return tl.broadcast_to(values, (BLOCK_N, HALVES))
    return tl.reshape(tl.broadcast_to(values[:, :, None], (BLOCK_N, GROUPS, HALVES // GROUPS)), (BLOCK_N, HALVES))


@triton.jit
def _moe_int4_kernel(
    a_ptr, qh_ptr, c_ptr, weights_ptr, sorted_pair_ids_ptr, block_experts_ptr, num_padded_ptr, s_ptr, z_ptr,
    perm_ptr, N, K, num_pairs, capacity,
    stride_am, stride_qe, stride_qn, stride_cm, stride_cn, stride_se, stride_s1,
    PAIRS_PER_A_ROW: tl.constexpr, MUL_ROUTING_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, GROUP: tl.constexpr, MAGIC: tl.constexpr, USE_ASM: tl.constexpr,
    PERMUTED: tl.constexpr = False, OFFSETS: tl.constexpr = False,
):  # fmt: skip
    """:func:`_moe_gemm_kernel` for int4 experts in the int4 kernel layout (``[E, N, K / 8]`` words, viewed as int16
    ``qh [E, N, K / 4]``), scales and zero points ``s`` / ``z [E, K / GROUP, N]`` (a's dtype; ``BLOCK_K`` divides
    ``K`` and nests with ``GROUP``, a multiple of 32). Each step's weight tile is dequantized as the dense tensor-core
    decode kernel does (``kernels/int4_gemm.py: _int4_mma_kernel``): Marlin's magic-number conversion, two weights per
    instruction (``_dequant_halves``), into the MMA's first operand straight from registers (``W @ a^T``: the tile's
    ``BLOCK_N`` rows are the MMA's M side), so nothing but a's rows goes through shared memory; a's columns are
    reordered to the tile's column order. ``PERMUTED`` (act order): the expert's rows were sorted by group, so a's
    columns are read through its permutation ``perm [E, K]`` (the groups are those of the sorted rows, as here).

    A step within one group (``BLOCK_K <= GROUP``) loads one scale / zero point per row; a step over several
    (``GROUP < BLOCK_K``: GGUF's groups of 32) loads ``[BLOCK_N, BLOCK_K / GROUP]`` and repeats each over its group's
    ``GROUP / 4`` int16 in registers (int16 ``e`` of the step holds inputs of its 32-chunk ``e // 8`` only).
    ``OFFSETS`` (GGUF experts): ``z`` holds offsets ``o``, ``W = q * s + o`` (ggml's own ``d * q + m`` form, whose
    zero points ``-o / s`` are not whole numbers, which ``magic + z`` would round): ``q`` exact from the magic float,
    ``o`` added by the fused multiply-add that scales, one rounding per weight and no zero-point arithmetic."""
    live, pair, valid, expert, offs_n = _block_of_pairs(sorted_pair_ids_ptr, block_experts_ptr, num_padded_ptr, N,
                                                        num_pairs, capacity, BLOCK_M, BLOCK_N, GROUP_M)
    if not live:
        return
    HALVES: tl.constexpr = BLOCK_K // 4
    GROUPS: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1  # groups per step
    DOT_DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    w_rows = tl.minimum(offs_n, N - 1)  # unmasked weight loads; tail columns are never stored
    offs_k, a_ptrs = _pair_a_rows(a_ptr, pair, stride_am, 1, PAIRS_PER_A_ROW, BLOCK_K)
    q_ptrs = qh_ptr + expert * stride_qe + w_rows[:, None] * stride_qn + tl.arange(0, HALVES)[None, :]
    sz_ptrs = expert * stride_se + w_rows
    if PERMUTED:
        # tile column p = ((j * C + c) * 4 + r) * 2 + h (C = BLOCK_K / 32) reads the step's input 32c + 16h + 4j + r:
        # the reshape-permute of the unpermuted path below, as index arithmetic
        chunks: tl.constexpr = BLOCK_K // 32
        tile_order = ((offs_k // 8) % chunks) * 32 + (offs_k % 2) * 16 + (offs_k // (8 * chunks)) * 4 \
            + (offs_k // 2) % 4
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(0, K // BLOCK_K):
        halves = tl.load(q_ptrs + t * HALVES)
        if BLOCK_K <= GROUP:  # [BLOCK_N, 1]
            group_row = (t * BLOCK_K) // GROUP * stride_s1
            s = tl.load(s_ptr + sz_ptrs + group_row).to(tl.float32)[:, None]
            z = tl.load(z_ptr + sz_ptrs + group_row).to(tl.float32)[:, None]
        else:  # [BLOCK_N, GROUPS]
            group_rows = (t * GROUPS + tl.arange(0, GROUPS)) * stride_s1
            s = tl.load(s_ptr + sz_ptrs[:, None] + group_rows[None, :]).to(tl.float32)
            z = tl.load(z_ptr + sz_ptrs[:, None] + group_rows[None, :]).to(tl.float32)
        s_dot = _per_int16(s.to(DOT_DTYPE), BLOCK_N, HALVES, GROUPS, BLOCK_K <= GROUP)
        if OFFSETS:  # z holds offsets: q exact from the magic float, o added by the scaling FMA
            magic_z = tl.full((BLOCK_N, HALVES), MAGIC, DOT_DTYPE)
            hi_z = tl.full((BLOCK_N, HALVES), -(MAGIC / 16.0), DOT_DTYPE)
            offset = _per_int16(z.to(DOT_DTYPE), BLOCK_N, HALVES, GROUPS, BLOCK_K <= GROUP)
        else:
            magic_z = _per_int16((MAGIC + z).to(DOT_DTYPE), BLOCK_N, HALVES, GROUPS, BLOCK_K <= GROUP)
            hi_z = _per_int16((-(MAGIC / 16.0) - z).to(DOT_DTYPE), BLOCK_N, HALVES, GROUPS, BLOCK_K <= GROUP)
            offset = s_dot  # unused
        w0, w1, w2, w3 = _dequant_halves(halves, magic_z, hi_z, s_dot, offset, DOT_DTYPE, USE_ASM, True, OFFSETS)
        # Tile column j * E + e holds nibble j of int16 e (the dense kernel's construction and a's order to match)
        w = tl.reshape(tl.permute(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (0, 2, 3, 1)), (BLOCK_N, BLOCK_K))
        if PERMUTED:  # gathered straight into the tile's column order (arithmetic, not a reshape of the gather)
            columns = tl.load(perm_ptr + expert * K + t * BLOCK_K + tile_order)
            a = tl.load(a_ptrs - offs_k[None, :] + columns[None, :], mask=valid[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs + t * BLOCK_K, mask=valid[:, None], other=0.0)
            a = tl.reshape(tl.permute(tl.reshape(a, (BLOCK_M, BLOCK_K // 32, 2, 4, 4)), (0, 3, 1, 4, 2)),
                           (BLOCK_M, BLOCK_K))
        if DOT_DTYPE == tl.float32:  # CPU-path dtype (tests): no TF32 rounding
            acc = tl.dot(w, tl.trans(a), acc, out_dtype=tl.float32, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(a), acc, out_dtype=tl.float32)
    _store_pair_rows(tl.trans(acc), c_ptr, weights_ptr, pair, valid, offs_n, N, stride_cm, stride_cn,
                     MUL_ROUTING_WEIGHT)


@triton.jit
def _moe_int8_kernel(
    a_ptr, q_ptr, c_ptr, weights_ptr, sorted_pair_ids_ptr, block_experts_ptr, num_padded_ptr, s_ptr, o_ptr,
    perm_ptr, N, K, num_pairs, capacity, stride_am, stride_qe, stride_qn, stride_cm, stride_cn, stride_se, stride_s1,
    PAIRS_PER_A_ROW: tl.constexpr, MUL_ROUTING_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, GROUP: tl.constexpr,
    OFFSETS: tl.constexpr, VIA_F32: tl.constexpr = False, PERMUTED: tl.constexpr = False,
):  # fmt: skip
    """:func:`_moe_gemm_kernel` for 8-bit experts: codes ``q [E, N, K]`` (int8 or uint8, exact in any float type),
    ``W = q * s (+ o)`` with scales / offsets ``s`` / ``o [E, K / GROUP, N]`` (``BLOCK_K`` divides ``K`` and nests
    with ``GROUP``). A step within one group (``BLOCK_K <= GROUP``: GPTQ's 128, a scale per channel) widens the codes
    alone and scales the step's partial product per column (offsets: the step's sums of a's rows times ``o``), as
    ``B_FP8_BLOCK`` does: no per-weight arithmetic. A step over several groups (GGUF's 16 and 32) computes each
    weight ``q * s + o`` in the scales' dtype (fp32 scales: one fused multiply-add, one rounding to a's dtype, the
    dequantized file's weight exactly) before the dot. ``PERMUTED`` (GPTQ act order): the expert's rows were sorted
    by group, so a's columns are read through its permutation ``perm [E, K]``. ``VIA_F32``: codes widened through
    fp32 (the CPU interpreter reinterprets an integer's bits as bf16 where it converts straight)."""
    live, pair, valid, expert, offs_n = _block_of_pairs(sorted_pair_ids_ptr, block_experts_ptr, num_padded_ptr, N,
                                                        num_pairs, capacity, BLOCK_M, BLOCK_N, GROUP_M)
    if not live:
        return
    w_cols = tl.minimum(offs_n, N - 1)  # unmasked weight loads; tail columns are never stored
    offs_k, a_ptrs = _pair_a_rows(a_ptr, pair, stride_am, 1, PAIRS_PER_A_ROW, BLOCK_K)
    q_ptrs = q_ptr + expert * stride_qe + w_cols[None, :] * stride_qn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    so_ptrs = expert * stride_se + w_cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, K // BLOCK_K):
        if PERMUTED:
            columns = tl.load(perm_ptr + expert * K + t * BLOCK_K + offs_k)
            a = tl.load(a_ptrs - offs_k[None, :] + columns[None, :], mask=valid[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs + t * BLOCK_K, mask=valid[:, None], other=0.0)
        q = tl.load(q_ptrs + t * BLOCK_K)
        if VIA_F32:
            q = q.to(tl.float32)
        if BLOCK_K <= GROUP:  # one group: the partial product scaled per column
            group_row = (t * BLOCK_K) // GROUP * stride_s1
            s = tl.load(s_ptr + so_ptrs + group_row).to(tl.float32)
            acc += tl.dot(a, q.to(a.dtype), input_precision=DOT_PRECISION) * s[None, :]
            if OFFSETS:
                o = tl.load(o_ptr + so_ptrs + group_row).to(tl.float32)
                acc += tl.sum(a.to(tl.float32), axis=1)[:, None] * o[None, :]
        else:  # [BLOCK_K / GROUP, BLOCK_N] scales repeated over their groups' rows in registers
            GROUPS: tl.constexpr = BLOCK_K // GROUP
            group_rows = (t * GROUPS + tl.arange(0, GROUPS)) * stride_s1
            s = tl.load(s_ptr + group_rows[:, None] + so_ptrs[None, :])
            s = tl.reshape(tl.broadcast_to(s[:, None, :], (GROUPS, GROUP, BLOCK_N)), (BLOCK_K, BLOCK_N))
            w = q.to(s.dtype) * s
            if OFFSETS:
                o = tl.load(o_ptr + group_rows[:, None] + so_ptrs[None, :]).to(s.dtype)
                w += tl.reshape(tl.broadcast_to(o[:, None, :], (GROUPS, GROUP, BLOCK_N)), (BLOCK_K, BLOCK_N))
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
    _store_pair_rows(acc, c_ptr, weights_ptr, pair, valid, offs_n, N, stride_cm, stride_cn, MUL_ROUTING_WEIGHT)


@triton.jit
def _moe_gguf_kernel(
    a_ptr, w_ptr, c_ptr, weights_ptr, sorted_pair_ids_ptr, block_experts_ptr, num_padded_ptr,
    N, K, num_pairs, capacity, row_bytes, stride_am, stride_we, stride_cm, stride_cn,
    PAIRS_PER_A_ROW: tl.constexpr, MUL_ROUTING_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GGML_TYPE: tl.constexpr, BLOCK: tl.constexpr, TYPE_SIZE: tl.constexpr,
):  # fmt: skip
    """:func:`_moe_gemm_kernel` for GGUF experts kept in their blocks (``w [E, N, row_bytes]``, the file's bytes):
    each step's ``[BLOCK_N, BLOCK_K]`` tile of the expert's weight decoded from its blocks as the dense block GEMM
    does (``kernels/gguf_gemm.py: _decode``, ggml's formulas), then the 16-bit tensor cores."""
    live, pair, valid, expert, offs_n = _block_of_pairs(sorted_pair_ids_ptr, block_experts_ptr, num_padded_ptr, N,
                                                        num_pairs, capacity, BLOCK_M, BLOCK_N, GROUP_M)
    if not live:
        return
    offs_k, a_ptrs = _pair_a_rows(a_ptr, pair, stride_am, 1, PAIRS_PER_A_ROW, BLOCK_K)
    expert_w = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=valid[:, None] & (offs_k[None, :] < K - k0), other=0.0)
        w = _gguf_decode(expert_w, offs_n, k0, N, K, row_bytes, GGML_TYPE, BLOCK, TYPE_SIZE, BLOCK_N, BLOCK_K)
        acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, input_precision=DOT_PRECISION)
    _store_pair_rows(acc, c_ptr, weights_ptr, pair, valid, offs_n, N, stride_cm, stride_cn, MUL_ROUTING_WEIGHT)


@triton.jit
def _moe_bnb4_kernel(
    a_ptr, w_ptr, absmax_ptr, codebook_ptr, row_scale_ptr, c_ptr, weights_ptr, sorted_pair_ids_ptr,
    block_experts_ptr, num_padded_ptr, N, K, num_pairs, capacity, stride_am, stride_we, stride_wn, stride_ae,
    stride_an, stride_re, stride_cm, stride_cn, PAIRS_PER_A_ROW: tl.constexpr, MUL_ROUTING_WEIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCKSIZE: tl.constexpr, ROW_SCALES: tl.constexpr = False,
):  # fmt: skip
    """:func:`_moe_gemm_kernel` for bitsandbytes 4-bit experts (``w [E, N, K / 2]``, two codes a byte, the high
    nibble first): each step's codes looked up in the codebook and scaled by their block's absmax, as
    ``kernels/bnb4_gemm.py`` does (``BLOCK_K`` divides ``BLOCKSIZE``, or NVFP4's blocks of 16 several a step;
    ``ROW_SCALES``: each expert's product scaled per output row, NVFP4's global scales)."""
    live, pair, valid, expert, offs_n = _block_of_pairs(sorted_pair_ids_ptr, block_experts_ptr, num_padded_ptr, N,
                                                        num_pairs, capacity, BLOCK_M, BLOCK_N, GROUP_M)
    if not live:
        return
    n_live = offs_n < N
    _, a_ptrs = _pair_a_rows(a_ptr, pair, stride_am, 1, PAIRS_PER_A_ROW, BLOCK_K)
    w_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + tl.arange(0, BLOCK_K // 2)[None, :]
    absmax_ptrs = absmax_ptr + expert * stride_ae + offs_n * stride_an
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    codebook = load_codebook(codebook_ptr)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=valid[:, None], other=0.0)
        packed = tl.load(w_ptrs + k0 // 2, mask=n_live[:, None], other=0).to(tl.int32)
        codes = tl.reshape(tl.join(packed >> 4, packed & 15), (BLOCK_N, BLOCK_K))  # byte b: codes 2b, 2b + 1
        scale = step_scales(absmax_ptrs, k0, n_live, BLOCK_K, BLOCKSIZE)
        w = (look_up(codebook, codes) * scale).to(a.dtype)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if ROW_SCALES:
        acc *= tl.load(row_scale_ptr + expert * stride_re + offs_n, mask=n_live, other=0.0)[None, :]
    _store_pair_rows(acc, c_ptr, weights_ptr, pair, valid, offs_n, N, stride_cm, stride_cn, MUL_ROUTING_WEIGHT)


def _moe_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, topk_weights: torch.Tensor | None,
              sorted_pair_ids: torch.Tensor, block_experts: torch.Tensor, num_padded: torch.Tensor,
              pairs_per_a_row: int, config: dict[str, int], quant: ExpertQuant | None = None,
              which: int = 0) -> None:  # fmt: skip
    """One grouped GEMM launch: ``b`` is ``w13`` (``which`` 0) or ``w2`` (1), quantized as ``quant`` says."""
    num_pairs, capacity = out.shape[0], sorted_pair_ids.shape[0]
    n, k = b.shape[1], b.shape[2]
    grid = (triton.cdiv(capacity, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    routing = topk_weights if topk_weights is not None else out
    common = dict(PAIRS_PER_A_ROW=pairs_per_a_row, MUL_ROUTING_WEIGHT=topk_weights is not None,
                  BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], GROUP_M=config["GROUP_M"],
                  num_warps=config["num_warps"], num_stages=config["num_stages"])
    if quant is not None and quant.bnb4:
        absmax, k = quant.parts(which)[0], 2 * b.shape[2]
        if a.stride(1) != 1 or k % quant.bnb_block or k % 32 or quant.bnb_block % 16:
            raise ValueError(f"4-bit codebook experts: {k} inputs (a multiple of 32) in blocks of {quant.bnb_block} "
                             "(a multiple of 16)")
        rows = quant.row_scale(which)
        _moe_bnb4_kernel[grid](
            a, b, absmax, quant.codebook, rows if rows is not None else absmax, out, routing, sorted_pair_ids,
            block_experts, num_padded, n, k, num_pairs, capacity, a.stride(0), b.stride(0), b.stride(1),
            absmax.stride(0), absmax.stride(1), rows.stride(0) if rows is not None else 0, out.stride(0),
            out.stride(1), DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
            BLOCK_K=_bnb4_block_k(quant.bnb_block, k), BLOCKSIZE=quant.bnb_block, ROW_SCALES=rows is not None,
            **common,
        )  # fmt: skip
        return
    if quant is not None and quant.ggml_type(which):
        ggml_type = quant.ggml_type(which)
        block, type_size = GGUF_KERNEL_TYPES[ggml_type]
        k = a.shape[1]
        if a.stride(1) != 1 or k % block or b.shape[2] != k // block * type_size:
            raise ValueError(f"GGUF experts: rows of {b.shape[2]} bytes do not hold {k} inputs of type {ggml_type} "
                             f"(whole blocks of {block})")
        _moe_gguf_kernel[grid](
            a, b, out, routing, sorted_pair_ids, block_experts, num_padded, n, k, num_pairs, capacity, b.shape[2],
            a.stride(0), b.stride(0), out.stride(0), out.stride(1),
            DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", BLOCK_K=64 if k % 64 == 0 else 32,
            GGML_TYPE=ggml_type, BLOCK=block, TYPE_SIZE=type_size, **common,
        )  # fmt: skip
        return
    if quant is not None and quant.int8_stack(which):
        scale, _, group, perm = quant.parts(which)
        offsets = quant.offsets(which)
        block_k = _int8_block_k(config["BLOCK_K"], group, k)
        if a.stride(1) != 1 or b.stride(2) != 1:
            raise ValueError("8-bit experts need activations and codes with unit column stride")
        _moe_int8_kernel[grid](
            a, b, out, routing, sorted_pair_ids, block_experts, num_padded, scale,
            offsets if offsets is not None else scale, perm if perm is not None else scale, n, k, num_pairs,
            capacity, a.stride(0), b.stride(0), b.stride(1), out.stride(0), out.stride(1), scale.stride(0),
            scale.stride(1), DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", BLOCK_K=block_k,
            GROUP=group, OFFSETS=offsets is not None, VIA_F32=not a.is_cuda, PERMUTED=perm is not None, **common,
        )  # fmt: skip
        return
    if quant is not None and quant.parts(which)[2]:
        scale, zeros, group, perm = quant.parts(which)
        offsets = quant.offsets(which)
        k = 8 * b.shape[2]
        block_k = _int4_block_k(config["BLOCK_K"], group, k)
        if a.stride(1) != 1:
            raise ValueError("int4 experts need activations with unit column stride")
        halves = b.view(torch.int16)  # [E, N, K / 4]
        _moe_int4_kernel[grid](
            a, halves, out, routing, sorted_pair_ids, block_experts, num_padded, scale,
            zeros if offsets is None else offsets, perm if perm is not None else scale, n, k, num_pairs, capacity,
            a.stride(0), halves.stride(0), halves.stride(1), out.stride(0), out.stride(1), scale.stride(0),
            scale.stride(1), BLOCK_K=block_k, GROUP=group, MAGIC=_MAGIC_VALUES[a.dtype],
            USE_ASM=a.is_cuda and a.dtype in _TRITON_DTYPES, PERMUTED=perm is not None, OFFSETS=offsets is not None,
            **common,
        )  # fmt: skip
        return
    kind, scale, block_k = B_PLAIN, out, config["BLOCK_K"]
    if quant is not None and quant.block is not None:
        kind, scale = B_FP8_BLOCK, quant.parts(which)[0]
        block_k = _block_k_within(block_k, quant.block[1])
        if quant.block[1] % block_k:
            raise ValueError(f"fp8 expert scale blocks {quant.block} need a K side of whole 16-column steps.")
    elif quant is not None:
        kind, scale = B_FP8_CHANNEL, quant.parts(which)[0]
    _moe_gemm_kernel[grid](
        a, b, out, routing, sorted_pair_ids, block_experts, num_padded, scale, n, k, num_pairs, capacity,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1),
        scale.stride(0) if kind != B_PLAIN else 0, scale.stride(1) if kind == B_FP8_BLOCK else 0,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", BLOCK_K=block_k, B_KIND=kind,
        SCALE_N=quant.block[0] if kind == B_FP8_BLOCK else 0, SCALE_K=quant.block[1] if kind == B_FP8_BLOCK else 0,
        **common,
    )  # fmt: skip


def _int4_block_k(block_k: int, group: int, k: int) -> int:
    """The int4 experts' K step: the config's (32..128, or up to a larger group), halved until it divides K and
    nests with the group (a step within one group, or over whole groups; groups are whole 32-row chunks)."""
    if group % KERNEL_K_BLOCK or k % KERNEL_K_BLOCK:
        raise ValueError(f"int4 experts need groups ({group}) and inputs ({k}) of whole {KERNEL_K_BLOCK}-row chunks.")
    block_k = max(KERNEL_K_BLOCK, min(block_k, max(group, 128)))
    block_k = 1 << (block_k.bit_length() - 1)  # a group of 192 under a tuned 256 would be a step of 192: arange
    return _nested_step(block_k, KERNEL_K_BLOCK, group, k)


def _nests(step: int, group: int, k: int) -> bool:
    """Whether K steps of ``step`` divide K and nest with the scale groups (within one group, or over whole ones)."""
    return k % step == 0 and (group % step == 0 or step % group == 0)


def _nested_step(step: int, floor: int, group: int, k: int) -> int:
    """``step`` (a power of two) halved until it :func:`_nests` or reaches ``floor``."""
    while step > floor and not _nests(step, group, k):
        step //= 2
    return step


def _bnb4_block_k(block: int, k: int) -> int:
    """The 4-bit codebook experts' K step (in codes): 64 where it divides K and nests with the block (one block or
    whole blocks a step), else 32. NVFP4's blocks of 16 four a step took 21-22% less than two (H100, Qwen3-30B-A3B's
    experts at 64 and 256 tokens, thirty-third session)."""
    step = _nested_step(64, 32, block, k)
    if not _nests(step, block, k):
        raise ValueError(f"4-bit codebook experts: blocks of {block} codes neither divide nor are whole steps of 32")
    return step


def _int8_block_k(block_k: int, group: int, k: int) -> int:
    """The 8-bit experts' K step: the config's (16..128), halved until it divides K and nests with the group (within
    one group, or over whole groups); groups and K of whole 16-row steps."""
    if group % 16 or k % 16 or k % group:
        raise ValueError(f"8-bit experts need groups ({group}) dividing their inputs ({k}), both of whole 16-row steps")
    return _nested_step(max(16, min(block_k, 128)), 16, group, k)


def _block_k_within(block_k: int, scale_k: int) -> int:
    """The largest K step of at most ``block_k`` (16..128, a power of two) that divides the scale block's K side."""
    while block_k > 16 and scale_k % block_k:
        block_k //= 2
    return block_k


# ---------------------------------------------------------------------------------------------------- configs


def default_config(num_tokens: int, num_experts: int) -> dict[str, int]:
    """Untuned defaults (vLLM's starting points): small row blocks when few tokens reach each expert (decode), larger
    tiles for prefill."""
    if num_tokens <= 64 or num_tokens <= num_experts:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


def shape_key(num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
              weight_dtype: torch.dtype | str | None = None) -> str:  # fmt: skip
    """The table key of a shape; quantized expert weights (``weight_dtype``: fp8's dtype, ``"int4"``) are a shape of
    their own."""
    key = f"E={num_experts},H={hidden},I={inter},dtype={str(dtype).removeprefix('torch.')}"
    if weight_dtype is not None and weight_dtype != dtype:
        key += f",w={str(weight_dtype).removeprefix('torch.')}"
    return key


@functools.lru_cache(maxsize=1)
def _tuned_table() -> dict[str, dict[str, dict[str, int]]]:
    """``shape_key -> {token count: config}`` from ``fused_moe_configs.json`` (a missing file: no tuned shapes)."""
    if not CONFIG_FILE.exists():
        return {}
    return json.loads(CONFIG_FILE.read_text()).get("configs", {})


def get_config(num_tokens: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
               weight_dtype: torch.dtype | str | None = None) -> dict[str, int]:  # fmt: skip
    """The tuned config of the nearest tuned token count for this shape, else ``default_config``."""
    table = _tuned_table().get(shape_key(num_experts, hidden, inter, dtype, weight_dtype))
    if not table:
        return default_config(num_tokens, num_experts)
    nearest = min(table, key=lambda m: abs(int(m) - num_tokens))
    return table[nearest]


# ---------------------------------------------------------------------------------------------------- entry points


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, config: dict[str, int] | None = None,
                     quant: ExpertQuant | None = None) -> torch.Tensor:  # fmt: skip
    """The Triton path: align, gate|up grouped GEMM, SiLU-and-mul, down grouped GEMM with the routing weights, top-k
    sum. ``x [T, H]``; returns ``[T, H]`` in ``x``'s dtype. Quantized experts: :class:`ExpertQuant`."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape[0], w13.shape[1], w2.shape[1]
    if config is None:
        config = get_config(num_tokens, num_experts, hidden, two_inter // 2, x.dtype, _weight_kind(w13, quant))
    num_pairs = num_tokens * top_k
    sorted_pair_ids, block_experts, num_padded = moe_align_block_size(topk_ids, num_experts, config["BLOCK_M"])
    gate_up = torch.empty(num_pairs, two_inter, dtype=x.dtype, device=x.device)
    _moe_gemm(x, w13, gate_up, None, sorted_pair_ids, block_experts, num_padded, top_k, config, quant, 0)
    hidden_states = silu_and_mul_triton(gate_up)
    down = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _moe_gemm(hidden_states, w2, down, topk_weights.reshape(-1).float().contiguous(), sorted_pair_ids,
              block_experts, num_padded, 1, config, quant, 1)  # fmt: skip
    return down.view(num_tokens, top_k, hidden).sum(dim=1)


def _weight_kind(w13: torch.Tensor, quant: ExpertQuant | None) -> torch.dtype | str | None:
    """What the config table keys the experts' weights by: their dtype, ``int4`` (packed in int32), ``int8``, their
    GGML types (``gguf12-14``) or each stack's kind where they differ (``int4-gguf14``, ``int4-int8``)."""
    if quant is not None and (quant.int4 or quant.gguf or quant.w13_int8 or quant.w2_int8):
        kinds = [f"gguf{quant.ggml_type(which)}" if quant.ggml_type(which) else
                 "int8" if quant.int8_stack(which) else "int4" for which in (0, 1)]  # fmt: skip
        if kinds[0] == kinds[1] and kinds[0] in ("int4", "int8"):
            return kinds[0]
        if quant.ggml_type(0) and quant.ggml_type(1):
            return f"gguf{quant.w13_ggml}-{quant.w2_ggml}"
        return "-".join(kinds)
    if quant is not None and quant.bnb4:
        return "bnb4"
    return w13.dtype


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, router_logits: torch.Tensor, top_k: int,
              renormalize: bool, *, backend: str = "auto", quant: ExpertQuant | None = None
              ) -> torch.Tensor:  # fmt: skip
    """Route (softmax, top-k, optional renormalisation) and run the experts: Triton on CUDA, the reference loop
    otherwise (or with ``backend="torch"``). ``quant``: quantized experts (:class:`ExpertQuant`)."""
    topk_weights, topk_ids = fused_topk(router_logits, top_k, renormalize)
    if use_triton(x, backend):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, quant=quant)
    return fused_moe_ref(x, w13, w2, topk_weights, topk_ids, quant)
