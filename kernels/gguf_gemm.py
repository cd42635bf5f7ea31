"""GGUF block-quantized weight GEMM: ``out[M, N] = x[M, K] @ W[N, K]^T`` with ``W`` kept in its GGML blocks.

Weight layout: exactly the file's bytes, ``uint8 [N, K / block * type_size]`` (one row of blocks per output channel).
Types dequantized in the kernel (``GGUF_KERNEL_TYPES``): Q4_0, Q4_1, Q8_0 (32-element blocks) and Q4_K, Q5_K, Q6_K
(256-element super-blocks). Every element is decoded from its block by index (``_decode`` in Triton, ``_element_maps``
+ ``dequantize_gguf`` in torch, the same formulas as ggml's ``dequantize_row_*``):

- Q4_0 ``[d f16, qs 16]``: ``(nib(qs[e % 16], e // 16) - 8) * d``; Q4_1 ``[d, m, qs 16]``: ``nib * d + m``;
  Q8_0 ``[d, qs int8 32]``: ``qs[e] * d``.
- Q4_K ``[d, dmin, scales 12, qs 128]`` and Q5_K ``[d, dmin, scales 12, qh 32, qs 128]``: sub-block ``s = e // 32``
  with 6-bit scale/min packed in ``scales``; ``d * sc * q - dmin * m``, Q5_K's fifth bit ``qh[e % 32] >> s``.
- Q6_K ``[ql 128, qh 64, scales int8 16, d]``: ``d * sc * (q6 - 32)``.

Q4_0, Q4_1 and Q8_0 at M <= 4 (decode of a few sequences; the default SmolLM2's linears are Q4_1, its embedding and
tied LM head Q8_0) take ``_gguf_small_decode_kernel``, which reads whole words of each block instead of one load per
byte. Otherwise one kernel, two launch shapes: decode (M <= 16) keeps the whole (padded) batch in one program and sums
the ``[M, N, K]`` tile product (no ``tl.dot`` minimum of 16 rows to pad to); larger M dequantizes a
``[block_n, block_k]`` tile and feeds ``tl.dot``. ``gguf_linear_ref`` (dequantize, fp32 matmul) is the reference and
the CPU path. ``q4_blocks_as_int4`` rewrites Q4_0 / Q4_1 / Q4_K weights (``INT4_TYPES``) for the w4a16 int4
kernels instead (``kernels/int4_gemm.py`` and the int4 experts' ``kernels/fused_moe.py``, group 32), which
``core/layers/quantization/gguf.py`` does on CUDA; ``blocks_as_int8`` rewrites Q8_0 / Q6_K / Q5_K expert stacks
(``INT8_TYPES``) for the fused MoE's 8-bit experts likewise.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton

# GGMLQuantizationType values -> (elements per block, bytes per block).
Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 8, 12, 13, 14
GGUF_KERNEL_TYPES: dict[int, tuple[int, int]] = {
    Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210),
}
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The word-load decode kernel (M <= 4, 32-element types): (output channels, 32-blocks per iteration, warps) per type,
# for M = 1 and for M = 2..4. Q4_1 and Q8_0 from the H200 sweep (2026-12-02, seventh session: `python
# benchmarks/bench_gguf_gemm.py --types Q4_1 Q8_0 --m 1 4 --sweep-small`, CUDA-graph timing, the nine SmolLM2 and
# Llama-3.1-8B shapes summed): Q4_1 M = 1 267 us against 452 for the first guess (32, 4, 4) and 1,997 for the
# byte-gather kernel; Q4_1 M = 4 1,017 / 1,170 / 2,859; Q8_0 M = 1 and 4 within 5% of their guesses. Q4_0 is not
# measured and keeps the offline guess. Still 1.8x bf16 cuBLAS's time at M = 1 on Llama-8B's gate_up (103 / 57 us).
SMALL_DECODE_MAX_M = 4
SMALL_DECODE_CONFIGS: dict[tuple[int, bool], tuple[int, int, int]] = {
    (Q4_0, True): (32, 4, 4), (Q4_1, True): (16, 8, 8), (Q8_0, True): (16, 8, 4),
    (Q4_0, False): (32, 4, 4), (Q4_1, False): (16, 8, 4), (Q8_0, False): (16, 8, 4),
}  # (type, M == 1) -> config
_WORDS = {Q4_1: (4, 8), Q4_0: (8, 4), Q8_0: (16, 2)}  # a block's quant words and quants per word (the kernel's)


# ---------------------------------------------------------------------------------------------------------------
# torch reference


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of every block (``blocks``: int32 byte values ``[..., type_size]``), as fp32."""
    bits = blocks[..., at] | (blocks[..., at + 1] << 8)
    return torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(torch.float16).float()


def _signed8(values: torch.Tensor) -> torch.Tensor:
    return torch.where(values >= 128, values - 256, values)


@functools.lru_cache(maxsize=None)
def _element_maps(ggml_type: int) -> dict[str, tuple[int, ...]]:
    """Per element of a block: the byte offsets and shifts its quant bits (and its sub-block scale) come from."""
    block, _ = GGUF_KERNEL_TYPES[ggml_type]
    e = list(range(block))
    if ggml_type in (Q4_0, Q4_1):
        header = 2 if ggml_type == Q4_0 else 4
        return {"q_byte": tuple(header + i % 16 for i in e), "q_shift": tuple(4 * (i // 16) for i in e)}
    if ggml_type == Q8_0:
        return {"q_byte": tuple(2 + i for i in e)}
    if ggml_type in (Q4_K, Q5_K):
        qs = 16 if ggml_type == Q4_K else 48
        return {"q_byte": tuple(qs + 32 * (i // 64) + i % 32 for i in e), "q_shift": tuple(4 * ((i // 32) % 2) for i in e),
                "sub": tuple(i // 32 for i in e), "qh_byte": tuple(16 + i % 32 for i in e)}
    # Q6_K: halves of 128, quarters of 32 within a half
    half, quarter, lane = [i // 128 for i in e], [(i % 128) // 32 for i in e], [i % 32 for i in e]
    return {
        "q_byte": tuple(64 * h + 32 * (t % 2) + l for h, t, l in zip(half, quarter, lane)),
        "q_shift": tuple(4 * (t // 2) for t in quarter),
        "qh_byte": tuple(128 + 32 * h + l for h, l in zip(half, lane)),
        "qh_shift": tuple(2 * t for t in quarter),
        "scale_byte": tuple(192 + 8 * h + l // 16 + 2 * t for h, t, l in zip(half, quarter, lane)),
    }


@functools.lru_cache(maxsize=None)
def _device_maps(ggml_type: int, device: str) -> dict[str, torch.Tensor]:
    """``_element_maps`` as index tensors on ``device``, made once (the first, eager call): a CUDA graph capture
    cannot copy host lists to the device."""
    return {k: torch.tensor(v, device=device) for k, v in _element_maps(ggml_type).items()}


def _k_scale_min(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 6-bit scales and mins ``[..., 8]`` of the 8 sub-blocks, unpacked from the 12 bytes at offset 4."""
    s0, s4, s8 = blocks[..., 4:8], blocks[..., 8:12], blocks[..., 12:16]
    scale = torch.cat([s0 & 63, (s8 & 0xF) | ((s0 >> 6) << 4)], dim=-1)
    minimum = torch.cat([s4 & 63, (s8 >> 4) | ((s4 >> 6) << 4)], dim=-1)
    return scale.float(), minimum.float()


def _half_at(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of every uint8 block ``[..., type_size]``, as fp32 ``[..., 1]``."""
    return blocks[..., at : at + 2].contiguous().view(torch.float16).float()


def _q4_codes(blocks: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """The 4-bit codes of Q4_0 / Q4_1 blocks (uint8 ``[N, blocks, type_size]``) in element order, ``[N, blocks, 32]``
    (low nibbles are elements 0-15, high nibbles 16-31)."""
    qs = blocks[..., 2:] if ggml_type == Q4_0 else blocks[..., 4:]
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _dequantize_32(blocks: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Q4_0 / Q4_1 / Q8_0 blocks (uint8 ``[N, blocks, type_size]``) -> fp32 ``[N, blocks, 32]``."""
    if ggml_type == Q8_0:
        return blocks[..., 2:].contiguous().view(torch.int8).float() * _half_at(blocks, 0)
    q = _q4_codes(blocks, ggml_type).float()
    if ggml_type == Q4_0:
        return (q - 8) * _half_at(blocks, 0)
    return q * _half_at(blocks, 0) + _half_at(blocks, 2)


INT4_TYPES = (Q4_0, Q4_1, Q4_K)  # 4-bit codes with a scale and an offset per 32 inputs: the int4 kernels' form


def _q4_groups(raw: torch.Tensor, ggml_type: int, in_features: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """A Q4_0 / Q4_1 / Q4_K weight (``uint8 [N, row_bytes]``) as ``(codes [N, K / 32, 32] uint8, s, o)`` with ``s``
    and ``o`` fp32 ``[N, K / 32]``: ``W = q * s + o`` for each 32 inputs (a Q4_0 / Q4_1 block, a Q4_K sub-block),
    exactly (fp32 holds each product of an fp16 and a 6-bit scale). Q4_0 ``s = d, o = -8 d``; Q4_1 ``s = d, o = m``;
    Q4_K sub-block ``j`` ``s = d * sc_j, o = -dmin * m_j`` (``_k_scale_min``)."""
    block, type_size = GGUF_KERNEL_TYPES[ggml_type]
    n = raw.shape[0]
    blocks = raw.reshape(n, in_features // block, type_size)
    d = _half_at(blocks, 0)  # [N, blocks, 1]
    if ggml_type == Q4_K:  # 32-byte chunk c of qs: sub-block 2c in its low nibbles, 2c + 1 in its high ones
        qs = blocks[..., 16:].reshape(n, -1, 4, 1, 32)
        codes = torch.cat([qs & 0xF, qs >> 4], dim=3).reshape(n, -1, 32)
        scale, minimum = _k_scale_min(blocks)
        return codes, (d * scale).reshape(n, -1), (-_half_at(blocks, 2) * minimum).reshape(n, -1)
    codes = _q4_codes(blocks, ggml_type)
    if ggml_type == Q4_0:
        return codes, d[..., 0], -8 * d[..., 0]
    return codes, d[..., 0], _half_at(blocks, 2)[..., 0]


def q4_blocks_as_int4(raw: torch.Tensor, ggml_type: int, in_features: int, dtype: torch.dtype, *,
                      offsets: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """A Q4_0 / Q4_1 / Q4_K weight (``uint8 [N, row_bytes]``) as the w4a16 kernels' ``(codes [K, N] int32, scales,
    zeros)`` (``kernels/int4_gemm.py``: ``W = (q - z) * s``, one group per 32 inputs: a Q4_0 / Q4_1 block, a Q4_K
    sub-block; scales and zeros ``[K / 32, N]`` in ``dtype``), or None when the blocks do not fit that form exactly
    enough. ``offsets``: ``(codes, scales, offsets)`` with ``W = q * s + o`` instead (``_q4_groups``; the int4
    experts' kernel takes that form), which every block fits (None only for a scale or offset past ``dtype``'s range).

    Q4_0 ``(q - 8) d``: ``s = d, z = 8``, exact in fp16 / fp32 (bf16 rounds the fp16 ``d``, as bf16 rounds each
    weight of the dequantized model). Q4_1 ``q d + m`` and Q4_K ``d sc q - dmin m``: ``z = -o / s`` (``m / d``,
    ``dmin m / (d sc)``), rounded to ``dtype`` (an error of ``|o|`` times dtype's half-ulp, the size of rounding the
    group's largest weight to it). A group with ``s = 0`` is the constant ``o``: ``s = o, z = -1`` with codes 0. ggml
    writes a Q4_1 block with ``d = 0`` with quants 0 (others there return None); its Q4_K quantizer leaves a
    sub-block's quants as they were when its 6-bit scale rounds to 0 (the weight does not depend on them), so they are
    set to 0. A ``z`` that overflows ``dtype`` (fp16, a tiny ``s``) returns None."""
    if ggml_type not in INT4_TYPES:
        raise ValueError(f"GGUF type {ggml_type} is not a 4-bit type with a scale and an offset per 32 elements")
    codes, s, o = _q4_groups(raw, ggml_type, in_features)
    codes = codes.to(torch.int32)
    if offsets:
        scales, extra = s, o
    elif ggml_type == Q4_0:
        scales, extra = s, torch.full_like(s, 8.0)
    else:
        constant = s == 0
        if ggml_type == Q4_K:
            codes = codes.masked_fill(constant[..., None], 0)
        elif bool((codes[constant] != 0).any()):
            return None
        scales = torch.where(constant, o, s)
        extra = torch.where(constant, torch.full_like(s, -1.0), -o / torch.where(constant, 1.0, s))
    scales, extra = scales.t().to(dtype).contiguous(), extra.t().to(dtype).contiguous()
    if not torch.isfinite(extra).all() or not torch.isfinite(scales).all():
        return None
    return codes.reshape(raw.shape[0], in_features).t().contiguous(), scales, extra  # codes [K, N]


INT8_TYPES = (Q8_0, Q6_K, Q5_K)  # codes of at most 8 bits with a scale (and offset) per 32 or 16 inputs
INT8_GROUPS = {Q8_0: 32, Q6_K: 16, Q5_K: 32}


def blocks_as_int8(raw: torch.Tensor, ggml_type: int, in_features: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """A Q8_0 / Q6_K / Q5_K weight (``uint8 [N, row_bytes]``) as 8-bit codes, scales and offsets, ``W = q * s + o``
    (the 8-bit experts' form, ``kernels/fused_moe.py: _moe_int8_kernel``): codes ``[N, K]`` int8, ``s`` and ``o``
    fp32 ``[K / group, N]``. Q8_0 (group 32): ``q`` the block's int8, ``s = d``, no offset; Q6_K (group 16, a
    sub-block): ``q = q6 - 32``, ``s = d * sc`` (its int8 scale), no offset; Q5_K (group 32): ``q`` the 5-bit code,
    ``s = d * sc``, ``o = -dmin * m`` (``_k_scale_min``). Every block fits and fp32 holds each ``s`` and ``o``
    exactly (an fp16 times an 8-bit integer), so ``q * s + o`` in fp32 is ``dequantize_gguf``'s weight bit for bit,
    and rounding it to the activations' dtype is the dequantized file's rounding (bf16 scales would round ``d * sc``
    first: up to 2^-9 of every weight of the group, the same error again on top)."""
    if ggml_type not in INT8_TYPES:
        raise ValueError(f"GGUF type {ggml_type} is not an 8-bit-code type (Q8_0 / Q6_K / Q5_K)")
    block, type_size = GGUF_KERNEL_TYPES[ggml_type]
    n = raw.shape[0]
    blocks = raw.reshape(n, in_features // block, type_size)
    if ggml_type == Q8_0:
        codes = blocks[..., 2:].contiguous().view(torch.int8)
        return codes.reshape(n, in_features), _half_at(blocks, 0)[..., 0].t().contiguous(), None
    words = blocks.to(torch.int32)
    maps = _device_maps(ggml_type, str(raw.device))
    q = words[..., maps["q_byte"]]  # [N, blocks, block]
    if ggml_type == Q6_K:
        low = (q >> maps["q_shift"]) & 0xF
        high = (words[..., maps["qh_byte"]] >> maps["qh_shift"]) & 3
        codes = (low | (high << 4)) - 32
        scale = _half_at(blocks, 208) * _signed8(words[..., 192:208]).float()  # sub-block j's scale: byte 192 + j
        offsets = None
    else:
        sub = maps["sub"]
        codes = ((q >> maps["q_shift"]) & 0xF) | (((words[..., maps["qh_byte"]] >> sub) & 1) << 4)
        sc, m = _k_scale_min(words)
        scale, offsets = _half_at(blocks, 0) * sc, -_half_at(blocks, 2) * m
        offsets = offsets.reshape(n, -1).t().contiguous()
    return codes.to(torch.int8).reshape(n, in_features), scale.reshape(n, -1).t().contiguous(), offsets


def dequantize_gguf(raw: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
    """fp32 ``[N, in_features]`` of a ``uint8 [N, row_bytes]`` GGUF tensor of one of ``GGUF_KERNEL_TYPES``."""
    block, type_size = GGUF_KERNEL_TYPES[ggml_type]
    n = raw.shape[0]
    if ggml_type in (Q4_0, Q4_1, Q8_0):  # byte-sliced fast path (the CPU serving path): no per-element gathers
        return _dequantize_32(raw.reshape(n, in_features // block, type_size), ggml_type).reshape(n, in_features)
    blocks = raw.reshape(n, in_features // block, type_size).to(torch.int32)
    maps = _device_maps(ggml_type, str(raw.device))
    q = blocks[..., maps["q_byte"]]  # [N, blocks, block]
    if ggml_type == Q8_0:
        out = _signed8(q).float() * _f16(blocks, 0)[..., None]
    elif ggml_type in (Q4_0, Q4_1):
        q = ((q >> maps["q_shift"]) & 0xF).float()
        d = _f16(blocks, 0)[..., None]
        out = (q - 8) * d if ggml_type == Q4_0 else q * d + _f16(blocks, 2)[..., None]
    elif ggml_type in (Q4_K, Q5_K):
        q = (q >> maps["q_shift"]) & 0xF
        sub = maps["sub"]
        if ggml_type == Q5_K:
            q = q | (((blocks[..., maps["qh_byte"]] >> sub) & 1) << 4)
        scale, minimum = _k_scale_min(blocks)
        out = (_f16(blocks, 0)[..., None] * scale)[..., sub] * q.float() - (_f16(blocks, 2)[..., None] * minimum)[..., sub]
    else:  # Q6_K
        low = (q >> maps["q_shift"]) & 0xF
        high = (blocks[..., maps["qh_byte"]] >> maps["qh_shift"]) & 3
        scale = _signed8(blocks[..., maps["scale_byte"]]).float()
        out = _f16(blocks, 208)[..., None] * scale * ((low | (high << 4)) - 32).float()
    return out.reshape(n, in_features)


def gguf_linear_ref(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, bias: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """Dequantize the whole weight, fp32 matmul; the result in ``out_dtype`` (default x's dtype)."""
    weight = dequantize_gguf(raw, ggml_type, x.shape[-1])
    out = x.float() @ weight.T
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype or x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton


@triton.jit
def _load_f16(ptr, mask):
    lo = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.int32)
    return (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_byte(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _per_32(values, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_N, BLOCK_K / 32]`` per-(sub-)block values repeated over their 32 elements: ``[BLOCK_N, BLOCK_K]``."""
    return tl.reshape(tl.broadcast_to(values[:, :, None], (BLOCK_N, BLOCK_K // 32, 32)), (BLOCK_N, BLOCK_K))


@triton.jit
def _decode(w_ptr, offs_n, k0, N, K, row_bytes, GGML_TYPE: tl.constexpr, BLOCK: tl.constexpr,
            TYPE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``[BLOCK_N, BLOCK_K]`` tile of W (inputs ``k0 ..``) decoded from its blocks (zeros outside ``N x K``).
    Scales are read once per 32-element (sub-)block and repeated, except Q6_K's (one per 16)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    e = offs_k % BLOCK
    row = w_ptr + offs_n[:, None].to(tl.int64) * row_bytes
    base = row + ((offs_k // BLOCK) * TYPE_SIZE)[None, :]
    offs_s = k0 // 32 + tl.arange(0, BLOCK_K // 32)  # 32-element (sub-)blocks of the tile
    mask_s = (offs_n[:, None] < N) & (offs_s[None, :] * 32 < K)
    base_s = row + ((offs_s * 32 // BLOCK) * TYPE_SIZE)[None, :]
    if GGML_TYPE == 8:  # Q8_0
        q = _load_byte(base + 2 + e[None, :], mask)
        q = tl.where(q >= 128, q - 256, q)
        w = q.to(tl.float32) * _per_32(_load_f16(base_s, mask_s), BLOCK_N, BLOCK_K)
    elif GGML_TYPE == 2 or GGML_TYPE == 3:  # Q4_0, Q4_1
        header = 2 if GGML_TYPE == 2 else 4
        q = ((_load_byte(base + header + (e % 16)[None, :], mask) >> (4 * (e // 16))[None, :]) & 0xF).to(tl.float32)
        d = _per_32(_load_f16(base_s, mask_s), BLOCK_N, BLOCK_K)
        if GGML_TYPE == 2:
            w = (q - 8.0) * d
        else:
            w = q * d + _per_32(_load_f16(base_s + 2, mask_s), BLOCK_N, BLOCK_K)
    elif GGML_TYPE == 12 or GGML_TYPE == 13:  # Q4_K, Q5_K
        qs = 16 if GGML_TYPE == 12 else 48
        q = (_load_byte(base + qs + (32 * (e // 64) + e % 32)[None, :], mask) >> (4 * ((e // 32) % 2))[None, :]) & 0xF
        if GGML_TYPE == 13:
            q = q | (((_load_byte(base + 16 + (e % 32)[None, :], mask) >> (e // 32)[None, :]) & 1) << 4)
        sub = (offs_s % 8)[None, :]
        j = sub % 4
        s0 = _load_byte(base_s + 4 + j, mask_s)
        s4 = _load_byte(base_s + 8 + j, mask_s)
        s8 = _load_byte(base_s + 12 + j, mask_s)
        low = sub < 4
        scale = tl.where(low, s0 & 63, (s8 & 0xF) | ((s0 >> 6) << 4)).to(tl.float32)
        minimum = tl.where(low, s4 & 63, (s8 >> 4) | ((s4 >> 6) << 4)).to(tl.float32)
        d_scale = _per_32(_load_f16(base_s, mask_s) * scale, BLOCK_N, BLOCK_K)
        d_min = _per_32(_load_f16(base_s + 2, mask_s) * minimum, BLOCK_N, BLOCK_K)
        w = d_scale * q.to(tl.float32) - d_min
    else:  # Q6_K
        half = e // 128
        quarter = (e % 128) // 32
        lane = e % 32
        ql = _load_byte(base + (64 * half + 32 * (quarter % 2) + lane)[None, :], mask) >> (4 * (quarter // 2))[None, :]
        qh = _load_byte(base + (128 + 32 * half + lane)[None, :], mask) >> (2 * quarter)[None, :]
        q = ((ql & 0xF) | ((qh & 3) << 4)) - 32
        sc = _load_byte(base + (192 + 8 * half + lane // 16 + 2 * quarter)[None, :], mask)
        sc = tl.where(sc >= 128, sc - 256, sc)
        w = _load_f16(base + 208, mask) * sc.to(tl.float32) * q.to(tl.float32)
    return w


@triton.jit
def _half_bits_to_f32(bits):
    """The low 16 bits of an int32 tensor as an fp16 value, widened to fp32."""
    return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _small_block_quants(starts, GGML_TYPE: tl.constexpr):
    """One 32-element block per entry of ``starts`` (``[BN, NB]`` byte addresses): ``(q, d, m, k_in_block)``, the
    quants as fp32 ``[BN, NB, WORDS, PER_WORD]`` in the order the words unpack to, the scale ``d`` and Q4_1's min ``m``
    (``[BN, NB]``; Q4_0 / Q8_0 give ``d`` again), and ``k_in_block`` ``[WORDS, PER_WORD]``: each quant's input."""
    if GGML_TYPE == 3:  # Q4_1 [d f16, m f16, qs 16]: 5 words of 4 bytes
        header = tl.load(starts.to(tl.pointer_type(tl.int32)))
        d = _half_bits_to_f32(header)
        m = _half_bits_to_f32(header >> 16)
        words = tl.load((starts[:, :, None] + 4 + 4 * tl.arange(0, 4)[None, None, :]).to(tl.pointer_type(tl.int32)))
        # nibble j of a word: byte j // 2 of it, low (element 4w + j // 2) or high (element 16 + 4w + j // 2)
        j = tl.arange(0, 8)
        q = ((words[:, :, :, None] >> (4 * j)[None, None, None, :]) & 0xF).to(tl.float32)
        k_in_block = (j % 2)[None, :] * 16 + 4 * tl.arange(0, 4)[:, None] + (j // 2)[None, :]
    elif GGML_TYPE == 2:  # Q4_0 [d f16, qs 16]: 9 words of 2 bytes
        d = tl.load(starts.to(tl.pointer_type(tl.int16))).to(tl.float16, bitcast=True).to(tl.float32)
        m = d
        words = tl.load((starts[:, :, None] + 2 + 2 * tl.arange(0, 8)[None, None, :]).to(tl.pointer_type(tl.int16)))
        j = tl.arange(0, 4)
        q = ((words.to(tl.int32)[:, :, :, None] >> (4 * j)[None, None, None, :]) & 0xF).to(tl.float32)
        k_in_block = (j % 2)[None, :] * 16 + 2 * tl.arange(0, 8)[:, None] + (j // 2)[None, :]
    else:  # Q8_0 [d f16, qs int8 32]: 17 words of 2 bytes
        d = tl.load(starts.to(tl.pointer_type(tl.int16))).to(tl.float16, bitcast=True).to(tl.float32)
        m = d
        words = tl.load((starts[:, :, None] + 2 + 2 * tl.arange(0, 16)[None, None, :]).to(tl.pointer_type(tl.int16)))
        j = tl.arange(0, 2)
        q = ((words.to(tl.int32)[:, :, :, None] << (24 - 8 * j)[None, None, None, :]) >> 24).to(tl.float32)
        k_in_block = 2 * tl.arange(0, 16)[:, None] + j[None, :]
    return q, d, m, k_in_block


@triton.jit
def _gguf_small_decode_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, row_bytes, stride_xm, stride_om,
                              GGML_TYPE: tl.constexpr, TYPE_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                              WORDS: tl.constexpr, PER_WORD: tl.constexpr):  # fmt: skip
    """Decode (M <= 4) for the 32-element types: Q4_0, Q4_1, Q8_0. The weight is read as whole words (4-byte words
    for Q4_1's 20-byte blocks, 2-byte for Q4_0's 18 and Q8_0's 34, the widest their block alignment allows) rather than
    one load per byte; x is gathered in the order the words unpack to (``_small_block_quants``).

    M = 1: each weight is dequantized with one FMA and its product accumulated in a tile-shaped accumulator, reduced
    once after the loop. M > 1: each block's dot products are taken on the raw quants and scaled once per block,
    ``d * sum(q x)`` plus ``m * sum(x)`` (Q4_1) or less ``8 d sum(x)`` (Q4_0).
    Program: ``BLOCK_N`` output channels x ``BLOCK_M`` rows, ``NB`` blocks of 32 inputs per iteration."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * row_bytes  # clamped: ragged N loads row N-1 again
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64) * stride_xm
    num_blocks = K // 32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_tile = tl.zeros((BLOCK_N, NB, WORDS, PER_WORD), dtype=tl.float32)  # M = 1 only
    for b0 in range(0, num_blocks, NB):
        blk = b0 + tl.arange(0, NB)
        blk_c = tl.minimum(blk, num_blocks - 1)  # a tail block past K reads the last block; its x is zero
        q, d, m, k_in_block = _small_block_quants(rows[:, None] + (blk_c * TYPE_SIZE)[None, :], GGML_TYPE)
        k_idx = (blk_c * 32)[:, None, None] + k_in_block[None, :, :]  # [NB, WORDS, PER_WORD]
        x_mask = (blk < num_blocks)[:, None, None]
        if BLOCK_M == 1:
            xs = tl.load(x_rows + k_idx, mask=x_mask, other=0.0).to(tl.float32)  # m_ok: the one row exists
            if GGML_TYPE == 3:
                w = q * d[:, :, None, None] + m[:, :, None, None]
            elif GGML_TYPE == 2:
                w = (q - 8.0) * d[:, :, None, None]
            else:
                w = q * d[:, :, None, None]
            acc_tile += w * xs[None, :, :, :]
        else:
            xs = tl.load(x_rows[:, None, None, None] + k_idx[None, :, :, :],
                         mask=m_ok[:, None, None, None] & x_mask[None, :, :, :], other=0.0).to(tl.float32)
            dots = tl.sum(tl.sum(q[None, :, :, :, :] * xs[:, None, :, :, :], axis=4), axis=3)  # [BM, BN, NB]
            if GGML_TYPE == 3:
                x_sums = tl.sum(tl.sum(xs, axis=3), axis=2)  # [BM, NB]
                acc += tl.sum(d[None, :, :] * dots + m[None, :, :] * x_sums[:, None, :], axis=2)
            elif GGML_TYPE == 2:
                x_sums = tl.sum(tl.sum(xs, axis=3), axis=2)
                acc += tl.sum(d[None, :, :] * (dots - 8.0 * x_sums[:, None, :]), axis=2)
            else:
                acc += tl.sum(d[None, :, :] * dots, axis=2)
    if BLOCK_M == 1:
        acc += tl.sum(tl.sum(tl.sum(acc_tile, axis=3), axis=2), axis=1)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def _gguf_gemm_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, row_bytes, stride_xm, stride_om,
                      GGML_TYPE: tl.constexpr, BLOCK: tl.constexpr, TYPE_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _decode(w_ptr, offs_n, k0, N, K, row_bytes, GGML_TYPE, BLOCK, TYPE_SIZE, BLOCK_N, BLOCK_K)
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def gguf_gemm(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """Triton: ``x [M, K]`` (contiguous rows) times the GGUF weight ``raw uint8 [N, row_bytes]``, output ``[M, N]``."""
    block, type_size = GGUF_KERNEL_TYPES[ggml_type]
    m, k = x.shape
    n = raw.shape[0]
    if k % block or raw.shape[1] != k // block * type_size:
        raise ValueError(f"GGUF type {ggml_type}: weight rows of {raw.shape[1]} bytes do not hold {k} inputs.")
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if 0 < m <= SMALL_DECODE_MAX_M and (ggml_type, m == 1) in SMALL_DECODE_CONFIGS:
        block_n, nb, num_warps = SMALL_DECODE_CONFIGS[ggml_type, m == 1]
        block_m = triton.next_power_of_2(m)
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
        _gguf_small_decode_kernel[grid](
            x, raw, bias if bias is not None else out, out, m, n, k, raw.shape[1], x.stride(0), out.stride(0),
            GGML_TYPE=ggml_type, TYPE_SIZE=type_size, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            NB=nb, WORDS=_WORDS[ggml_type][0], PER_WORD=_WORDS[ggml_type][1], num_warps=num_warps,
        )  # fmt: skip
        return out
    decode = m <= 16
    block_m = max(1, triton.next_power_of_2(m)) if decode else 64
    block_n = 32 if decode else 64
    block_k = 32 if (decode and block_m > 4) else 64
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _gguf_gemm_kernel[grid](
        x, raw, bias if bias is not None else out, out, m, n, k, raw.shape[1], x.stride(0), out.stride(0),
        GGML_TYPE=ggml_type, BLOCK=block, TYPE_SIZE=type_size, HAS_BIAS=bias is not None, USE_DOT=not decode,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


def gguf_linear(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, bias: torch.Tensor | None = None, *,
                out_dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """``x @ W^T (+ bias)`` for x of any leading shape: the Triton kernel on the GPU, else the reference."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if use_triton(x, backend) and x.dtype in _TRITON_DTYPES:
        out = gguf_gemm(x2.contiguous(), raw, ggml_type, bias, out_dtype)
    else:
        out = gguf_linear_ref(x2, raw, ggml_type, bias, out_dtype)
    return out.reshape(*lead, raw.shape[0])
