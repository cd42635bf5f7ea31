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
``w2 [E, H, I]``, in the activations' dtype or e4m3 with fp32 scales per expert and output channel (w8a16: the
kernel widens each weight tile in registers and scales the product). Launch configurations by shape live in
``fused_moe_configs.json`` beside this file (filled by ``benchmarks/tune_fused_moe.py`` on the GPU); shapes not in it
take ``default_config``, which are untuned defaults.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

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


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                  scale_block: tuple[int, int] | None = None) -> torch.Tensor:  # fmt: skip
    """Plain torch, one expert at a time (syncs with the host: ``nonzero``); the result in ``x``'s dtype. fp8 expert
    weights (``w13_scale [E, 2I]``, ``w2_scale [E, H]``: per output channel) are widened to x's dtype and their
    products scaled, as the kernel does (w8a16); with ``scale_block`` the scales are per block of each expert's
    weight (``[E, 2I / block_n, H / block_k]``, ``[E, H / block_n, I / block_k]``) and the weights are dequantized."""
    inter = w2.shape[-1]
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for expert in range(w13.shape[0]):
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        gate_up = _expert_product(x[tokens], w13, w13_scale, scale_block, expert)
        hidden = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = _expert_product(hidden, w2, w2_scale, scale_block, expert).float()
        out.index_add_(0, tokens, y * topk_weights[tokens, slots, None].float())
    return out.to(x.dtype)


def _expert_product(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, block: tuple[int, int] | None,
                    expert: int) -> torch.Tensor:  # fmt: skip
    """``x @ w[expert]^T`` for a 16-bit or fp8 expert (per-channel scales applied to the product in fp32, block
    scales to the weight)."""
    if scale is not None and block is not None:
        from kernels.fp8_block_gemm import dequantize_fp8_blocks

        return x @ dequantize_fp8_blocks(w[expert], scale[expert], block).to(x.dtype).t()
    product = x @ w[expert].to(x.dtype).t()
    if scale is None:
        return product
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


@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_pair_ids_ptr, block_experts_ptr, num_padded_ptr, b_scale_ptr,
    N, K, num_pairs, capacity,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_se, stride_sn,
    PAIRS_PER_A_ROW: tl.constexpr, MUL_ROUTING_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    B_FP8: tl.constexpr = False, SCALE_N: tl.constexpr = 0, SCALE_K: tl.constexpr = 0,
):  # fmt: skip
    """``c[pair, :] = a[pair // PAIRS_PER_A_ROW, :] @ b[expert]^T`` (times the pair's routing weight) for every
    ``BLOCK_M`` run of sorted pairs, which all share one expert; padding rows are masked out. ``B_FP8``: ``b`` is
    e4m3, widened to a's dtype in registers (w8a16), and the product is scaled by ``b_scale [expert, n]``, or with
    ``SCALE_N`` / ``SCALE_K`` (block-scaled weights) each K step's partial product by
    ``b_scale [expert, n // SCALE_N, k // SCALE_K]`` (``BLOCK_K`` divides ``SCALE_K``)."""
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
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // PAIRS_PER_A_ROW)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        if B_FP8:
            b = b.to(a.dtype)
        if SCALE_K > 0:
            block_scale = tl.load(b_scale_ptr + expert * stride_se + (offs_n // SCALE_N) * stride_sn
                                  + (k * BLOCK_K) // SCALE_K, mask=offs_n < N, other=0.0)  # fmt: skip
            acc += tl.dot(a, b, input_precision=DOT_PRECISION) * block_scale[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if B_FP8 and SCALE_K == 0:
        acc = acc * tl.load(b_scale_ptr + expert * stride_se + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if MUL_ROUTING_WEIGHT:
        acc = acc * tl.load(weights_ptr + pair, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def _moe_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, topk_weights: torch.Tensor | None,
              sorted_pair_ids: torch.Tensor, block_experts: torch.Tensor, num_padded: torch.Tensor,
              pairs_per_a_row: int, config: dict[str, int], b_scale: torch.Tensor | None = None,
              scale_block: tuple[int, int] | None = None) -> None:  # fmt: skip
    """One grouped GEMM launch; ``b_scale``: fp8 experts' scales, ``[E, N]`` per channel or (``scale_block``)
    ``[E, N / block_n, K / block_k]`` per block."""
    num_pairs = out.shape[0]
    capacity = sorted_pair_ids.shape[0]
    n, k = b.shape[1], b.shape[2]
    if scale_block is not None:
        config = {**config, "BLOCK_K": _block_k_within(config["BLOCK_K"], scale_block[1])}
    grid = (triton.cdiv(capacity, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    _moe_gemm_kernel[grid](
        a, b, out, topk_weights if topk_weights is not None else out, sorted_pair_ids, block_experts, num_padded,
        b_scale if b_scale is not None else out,
        n, k, num_pairs, capacity,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1),
        b_scale.stride(0) if b_scale is not None else 0, b_scale.stride(1) if scale_block is not None else 0,
        PAIRS_PER_A_ROW=pairs_per_a_row, MUL_ROUTING_WEIGHT=topk_weights is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        B_FP8=b_scale is not None, SCALE_N=scale_block[0] if scale_block else 0,
        SCALE_K=scale_block[1] if scale_block else 0,
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
              weight_dtype: torch.dtype | None = None) -> str:  # fmt: skip
    """The table key of a shape; fp8 expert weights (``weight_dtype``) are a shape of their own."""
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
               weight_dtype: torch.dtype | None = None) -> dict[str, int]:  # fmt: skip
    """The tuned config of the nearest tuned token count for this shape, else ``default_config``."""
    table = _tuned_table().get(shape_key(num_experts, hidden, inter, dtype, weight_dtype))
    if not table:
        return default_config(num_tokens, num_experts)
    nearest = min(table, key=lambda m: abs(int(m) - num_tokens))
    return table[nearest]


# ---------------------------------------------------------------------------------------------------- entry points


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, config: dict[str, int] | None = None,
                     w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                     scale_block: tuple[int, int] | None = None) -> torch.Tensor:  # fmt: skip
    """The Triton path: align, gate|up grouped GEMM, SiLU-and-mul, down grouped GEMM with the routing weights, top-k
    sum. ``x [T, H]``; returns ``[T, H]`` in ``x``'s dtype. fp8 experts: see :func:`fused_moe_ref`."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape
    if config is None:
        config = get_config(num_tokens, num_experts, hidden, two_inter // 2, x.dtype, w13.dtype)
    num_pairs = num_tokens * top_k
    sorted_pair_ids, block_experts, num_padded = moe_align_block_size(topk_ids, num_experts, config["BLOCK_M"])
    gate_up = torch.empty(num_pairs, two_inter, dtype=x.dtype, device=x.device)
    _moe_gemm(x, w13, gate_up, None, sorted_pair_ids, block_experts, num_padded, top_k, config, w13_scale,
              scale_block)
    hidden_states = silu_and_mul_triton(gate_up)
    down = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _moe_gemm(hidden_states, w2, down, topk_weights.reshape(-1).float().contiguous(), sorted_pair_ids,
              block_experts, num_padded, 1, config, w2_scale, scale_block)  # fmt: skip
    return down.view(num_tokens, top_k, hidden).sum(dim=1)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, router_logits: torch.Tensor, top_k: int,
              renormalize: bool, *, backend: str = "auto", w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, scale_block: tuple[int, int] | None = None
              ) -> torch.Tensor:  # fmt: skip
    """Route (softmax, top-k, optional renormalisation) and run the experts: Triton on CUDA, the reference loop
    otherwise (or with ``backend="torch"``). ``w13_scale`` / ``w2_scale``: fp8 expert weights' scales, per channel
    or per ``scale_block`` (:func:`fused_moe_ref`)."""
    topk_weights, topk_ids = fused_topk(router_logits, top_k, renormalize)
    if use_triton(x, backend):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale, w2_scale=w2_scale,
                                scale_block=scale_block)
    return fused_moe_ref(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, scale_block)
