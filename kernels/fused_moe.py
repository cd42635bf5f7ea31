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
per block, int4 with group scales and zero points), which the kernel widens tile by tile in registers. Launch
configurations by shape live in ``fused_moe_configs.json`` beside this file (filled by ``benchmarks/tune_fused_moe.py``
on the GPU); shapes not in it take ``default_config``, which are untuned defaults.
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
    with scales and zero points ``[E, K / group, N]`` (``w13_zeros`` / ``w2_zeros``). All run on the 16-bit tensor
    cores after widening the weight in registers."""

    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    block: tuple[int, int] | None = None
    w13_zeros: torch.Tensor | None = None
    w2_zeros: torch.Tensor | None = None
    w13_group: int = 0
    w2_group: int = 0

    @property
    def int4(self) -> bool:
        return self.w13_group > 0

    def parts(self, which: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(scales, zero points, int4 group size) of ``w13`` (0) or ``w2`` (1)."""
        if which == 0:
            return self.w13_scale, self.w13_zeros, self.w13_group
        return self.w2_scale, self.w2_zeros, self.w2_group


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, quant: ExpertQuant | None = None) -> torch.Tensor:  # fmt: skip
    """Plain torch, one expert at a time (syncs with the host: ``nonzero``); the result in ``x``'s dtype. Quantized
    experts (``quant``): fp8 per channel widened to x's dtype with the products scaled, as the kernel does; fp8
    blocks and int4 dequantized first."""
    inter = w2.shape[-1] * 8 if quant is not None and quant.int4 else w2.shape[-1]
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
    """``x @ w[expert]^T`` for one expert's 16-bit, fp8 or int4 weight (``which``: w13 or w2)."""
    if quant is None:
        return x @ w[expert].t()
    scale, zeros, group = quant.parts(which)
    if group:
        from kernels.int4_gemm import dequantize_int4

        return x @ dequantize_int4(w[expert], scale[expert], zeros[expert], group).to(x.dtype)
    if quant.block is not None:
        from kernels.fp8_block_gemm import dequantize_fp8_blocks

        return x @ dequantize_fp8_blocks(w[expert], scale[expert], quant.block).to(x.dtype).t()
    product = x @ w[expert].to(x.dtype).t()
    return (product.float() * scale[expert].float()).to(product.dtype)


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
B_PLAIN, B_FP8_CHANNEL, B_FP8_BLOCK, B_INT4 = 0, 1, 2, 3


@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_pair_ids_ptr, block_experts_ptr, num_padded_ptr, s_ptr, z_ptr,
    N, K, num_pairs, capacity,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_se, stride_s1,
    PAIRS_PER_A_ROW: tl.constexpr, MUL_ROUTING_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    B_KIND: tl.constexpr = 0, SCALE_N: tl.constexpr = 0, SCALE_K: tl.constexpr = 0, GROUP: tl.constexpr = 0,
):  # fmt: skip
    """``c[pair, :] = a[pair // PAIRS_PER_A_ROW, :] @ b[expert]^T`` (times the pair's routing weight) for every
    ``BLOCK_M`` run of sorted pairs, which all share one expert; padding rows are masked out. ``B_KIND``
    (:class:`ExpertQuant`): e4m3 ``b`` widened to a's dtype in registers, the product scaled by ``s [expert, n]``
    after the K loop (``B_FP8_CHANNEL``) or each K step's partial product by ``s [expert, n // SCALE_N,
    k // SCALE_K]`` (``B_FP8_BLOCK``; ``BLOCK_K`` divides ``SCALE_K``); or int4 words ``b [expert, n, k / 8]`` in the
    int4 kernel layout, dequantized ``(q - z) * s`` with ``s`` / ``z [expert, k // GROUP, n]`` (``B_INT4``; ``K`` a
    multiple of ``BLOCK_K``, which divides ``GROUP``)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(capacity, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row blocks walk the N tiles together (reuse of the expert's weight tiles in L2)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ids_ptr + offs_m).to(tl.int64)
    valid = pair < num_pairs
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // PAIRS_PER_A_ROW)[:, None] * stride_am + offs_k[None, :] * stride_ak
    if B_KIND == 3:  # int4: BLOCK_K / 8 words of each column a step
        b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + tl.arange(0, BLOCK_K // 8)[:, None]
        shifts = tl.arange(0, 8) * 4
    else:
        b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    s_ptrs = s_ptr + expert * stride_se + offs_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
        if B_KIND == 3:
            # Row 8p + i of the unpacked tile is nibble i of word p = 4c + r, i.e. input row 32c + 4i + r (the
            # kernel layout's interleave): a's columns reordered to match, as the dense int4 kernel does.
            a = tl.reshape(tl.permute(tl.reshape(a, (BLOCK_M, BLOCK_K // 32, 8, 4)), (0, 1, 3, 2)), (BLOCK_M, BLOCK_K))
            words = tl.load(b_ptrs + k * (BLOCK_K // 8), mask=n_live[None, :], other=0)
            q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N)).to(tl.float32)
            group_row = (k * BLOCK_K) // GROUP * stride_s1
            s = tl.load(s_ptrs + group_row, mask=n_live, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + expert * stride_se + offs_n + group_row, mask=n_live, other=0.0).to(tl.float32)
            b = (q * s[None, :] - (z * s)[None, :]).to(a.dtype)
        else:
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
        if B_KIND != 3:
            b_ptrs += BLOCK_K * stride_bk
    if B_KIND == 1:
        acc = acc * tl.load(s_ptrs, mask=n_live, other=0.0)[None, :]
    if MUL_ROUTING_WEIGHT:
        acc = acc * tl.load(weights_ptr + pair, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_live[None, :])


def _moe_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, topk_weights: torch.Tensor | None,
              sorted_pair_ids: torch.Tensor, block_experts: torch.Tensor, num_padded: torch.Tensor,
              pairs_per_a_row: int, config: dict[str, int], quant: ExpertQuant | None = None,
              which: int = 0) -> None:  # fmt: skip
    """One grouped GEMM launch: ``b`` is ``w13`` (``which`` 0) or ``w2`` (1), quantized as ``quant`` says."""
    num_pairs = out.shape[0]
    capacity = sorted_pair_ids.shape[0]
    n, k = b.shape[1], b.shape[2]
    kind, scale, zeros = B_PLAIN, out, out
    group = 0
    if quant is not None:
        scale, zeros, group = quant.parts(which)
        if group:
            kind, k = B_INT4, 8 * b.shape[2]
            config = {**config, "BLOCK_K": max(32, _block_k_within(config["BLOCK_K"], group))}
            if group % config["BLOCK_K"] or k % config["BLOCK_K"]:
                raise ValueError(f"int4 experts need groups ({group}) and inputs ({k}) of whole 32-row steps.")
        elif quant.block is not None:
            kind = B_FP8_BLOCK
            config = {**config, "BLOCK_K": _block_k_within(config["BLOCK_K"], quant.block[1])}
            if quant.block[1] % config["BLOCK_K"]:
                raise ValueError(f"fp8 expert scale blocks {quant.block} need a K side of whole 16-column steps.")
        else:
            kind = B_FP8_CHANNEL
        zeros = zeros if zeros is not None else scale
    grid = (triton.cdiv(capacity, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    _moe_gemm_kernel[grid](
        a, b, out, topk_weights if topk_weights is not None else out, sorted_pair_ids, block_experts, num_padded,
        scale, zeros,
        n, k, num_pairs, capacity,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1),
        scale.stride(0) if kind != B_PLAIN else 0, scale.stride(1) if kind in (B_FP8_BLOCK, B_INT4) else 0,
        PAIRS_PER_A_ROW=pairs_per_a_row, MUL_ROUTING_WEIGHT=topk_weights is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        B_KIND=kind, SCALE_N=quant.block[0] if kind == B_FP8_BLOCK else 0,
        SCALE_K=quant.block[1] if kind == B_FP8_BLOCK else 0, GROUP=group,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip


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
    """What the config table keys the experts' weights by: their dtype, or ``int4`` (packed in int32)."""
    if quant is not None and quant.int4:
        return "int4"
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
