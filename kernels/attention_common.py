"""What the decode and prefill attention kernels share: the layout they accept, the argument checks, the softmax
constant, and the torch pieces their references are built from.

Layout (both kernels): sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` (its ``q_len``
new tokens, at positions ``seq_lens[i] - q_len .. seq_lens[i] - 1``) and reads keys/values of positions
``0 .. seq_lens[i] - 1`` from the cache through ``block_tables[i]`` (the new tokens were written there first). GQA:
query head ``h`` reads KV head ``h // (Hq // Hk)``. ``q`` is ``[T, Hq, D]``; caches ``[num_blocks, block_size, Hk, D]``.

Both kernels serve all query heads of one KV head per program ("GQA packing"): the K/V tiles are read once per KV
head and multiplied against the whole query group with one tl.dot. Softmax runs in the log2 domain (exp2) with the
scale folded into ``scale * LOG2E``. Both run one key tile through :func:`attend_kv_tile` (load, scores, masks, online
softmax), so the causal / sliding-window / soft-cap / ALiBi rules exist once.

Head dims that are not powers of two (80, 96) run in a padded ``BLOCK_D = next_power_of_2(head_dim)`` block whose
extra columns are masked on every load and store (zeros add nothing to ``q @ k``).

FP8 KV cache (``float8_e4m3fn`` caches): the cache holds ``x / scale`` (clamped to e4m3's +-448) with one scale per
layer for keys and one for values (``k_scale``, ``v_scale``). The kernels load the fp8 tiles, convert them (fp16/bf16
queries: to fp16, q converted once per program, see :func:`queries_to_fp16` and :func:`fp8_read_flags`; fp32
queries: to fp32) and fold the scales in where they cost nothing: ``k_scale`` into the score scale (``q @ (k8 * ks) =
ks * (q @ k8)``) and ``v_scale`` into the final normalization (``sum p (v8 * vs) = vs * sum p v8``). For other cache
dtypes the scales are ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # largest finite e4m3fn value: quantized values are clamped to it (no inf in e4m3fn)


def is_fp8_cache(cache: torch.Tensor) -> bool:
    """Whether a KV cache tensor holds e4m3 values (to be read with its per-layer scale)."""
    return cache.dtype == FP8_KV_DTYPE


def quantize_kv_ref(x: torch.Tensor, scale: float, cache_dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the cache stores it: for an fp8 cache ``clamp(x / scale)`` in e4m3 (computed in float32, as the
    write kernel does), else ``x`` cast to the cache dtype."""
    if cache_dtype != FP8_KV_DTYPE:
        return x.to(cache_dtype)
    return (x.float() * (1.0 / scale)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(cache_dtype)


def dequantize_kv_ref(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cached values back in ``dtype``: fp8 values times their scale; other cache dtypes only cast."""
    if x.dtype != FP8_KV_DTYPE:
        return x.to(dtype)
    return (x.float() * scale).to(dtype)


def kv_compute_dtype(q: torch.Tensor, k_cache: torch.Tensor) -> torch.dtype:
    """The dtype the kernels' dots run in: the cache's, or q's when the cache is fp8 (its tiles are upcast)."""
    return q.dtype if is_fp8_cache(k_cache) else k_cache.dtype


FP8_READ_PATHS = ("f16-vpairs", "f16", "upcast", "f16-vsplit", "gluon")


def fp8_triton_path(path: str) -> str:
    """The read path of the Triton kernels under a config's ``fp8_path``: ``"gluon"`` reads as ``"f16-vsplit"``
    wherever the Gluon kernel does not run."""
    return "f16-vsplit" if path == "gluon" else path


def fp8_read_flags(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, path: str) -> dict[str, bool]:
    """The constexprs that choose how the kernels read an fp8 cache (``path``, a config's ``fp8_path``):

    - ``"f16-vpairs"`` (the default): dots in fp16 (:func:`queries_to_fp16`), and the V tile read as uint16 pairs
      converted to fp16 with one packed instruction each before its layout conversion (:func:`e4m3_pairs_to_fp16`);
    - ``"f16"``: dots in fp16, the tiles cast with ``.to`` (the compiler transposes V for ``p @ v`` byte by byte);
    - ``"upcast"``: the tiles cast to q's dtype (the first fp8 path: bf16 on the GPU, no packed e4m3 -> bf16);
    - ``"f16-vsplit"``: as ``"f16-vpairs"``, but ``p @ v`` in two halves, the even keys then the odd ones
      (:func:`split_pv`), so the fp16 V tile staged in shared memory for the dot is half the size (tiles of >= 32
      keys; smaller ones read V whole);
    - ``"gluon"``: decode calls that ``kernels/fp8_decode_gluon.py`` serves run there (tiles converted in
      registers); every other call reads as ``"f16-vsplit"`` (:func:`fp8_triton_path`).
    fp32 queries (CPU tests) always upcast; so does every path when the cache is not fp8. The pairs need an even head
    dim and even V strides (always true of the engine's caches); ``PAIRS_ASM`` (the PTX conversion) on CUDA only."""
    if path not in FP8_READ_PATHS:
        raise ValueError(f"unknown fp8 read path {path!r}; expected one of {FP8_READ_PATHS}")
    path = fp8_triton_path(path)
    f16_dots = is_fp8_cache(k_cache) and q.dtype in (torch.float16, torch.bfloat16) and path != "upcast"
    even = q.shape[-1] % 2 == 0 and all(s % 2 == 0 for s in v_cache.stride()[:3]) and v_cache.data_ptr() % 2 == 0
    v_pairs = f16_dots and path in ("f16-vpairs", "f16-vsplit") and even
    return {"FP8_F16_DOTS": f16_dots, "V_PAIRS": v_pairs, "PAIRS_ASM": v_pairs and q.is_cuda,
            "SPLIT_V": v_pairs and path == "f16-vsplit"}


def head_dim_block(head_dim: int) -> int:
    """The padded head-dim block of the kernels: a power of two >= 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(head_dim))


def score_params(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap_log2) for :func:`transform_scores`: with soft-capping the scores are ``cap * tanh(qk * scale /
    cap)`` then moved to the log2 domain; without it ``qk * scale * LOG2E``."""
    if softcap > 0:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 1.0


@triton.jit
def transform_scores(s, qk_scale, cap_log2, slopes, q_pos, k_pos, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Raw ``q @ k`` -> log2-domain logits: scale, optional soft-cap (tanh from exp: the interpreter and every triton
    version have exp), optional ALiBi bias ``slope * (k_pos - q_pos)`` (``slopes`` and ``q_pos`` per row)."""
    s = s * qk_scale
    if SOFTCAP:
        s = cap_log2 * (1.0 - 2.0 / (tl.exp(2.0 * s) + 1.0))
    if ALIBI:
        s += (slopes * 1.4426950408889634)[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
    return s


@triton.jit
def mask_invisible(s, q_pos, offs_n, kv_end, sliding_window, WINDOW: tl.constexpr):
    """Scores of keys a row must not see -> -inf: later than the row's position (causal), at or past ``kv_end`` (the
    context, or a decode split's end), and with ``WINDOW`` not among the last ``sliding_window`` positions."""
    visible = (offs_n[None, :] <= q_pos[:, None]) & (offs_n < kv_end)[None, :]
    if WINDOW:
        visible &= offs_n[None, :] > q_pos[:, None] - sliding_window
    return tl.where(visible, s, float("-inf"))


@triton.jit
def queries_to_fp16(q, qk_scale):
    """``q`` (fp16 or bf16) as fp16 for the dots against an fp8 cache's tiles, and the score scale to use with it.

    Why fp16: e4m3 -> fp16 is exact and one packed conversion per two values on sm_89+ (``cvt.rn.f16x2.e4m3x2``);
    e4m3 -> bf16 has no such instruction (e4m3x2 -> f16x2, then each half to bf16 alone), which made the fp8 loop
    instruction-bound.
    Overflow guard: fp16 ends at 65504 where bf16 does not; when the tile's largest ``|q|`` exceeds 2^15, the whole
    tile is divided by a power of two (exact) and ``qk_scale`` multiplied by it, so the scores are unchanged and no
    query element overflows. The dots accumulate in fp32 (``|q . k| <= D * 65504 * 448``, far inside fp32). Called once
    per program, not per tile."""
    q32 = q.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(q32), 1), 0)
    shift = tl.where(amax > 32768.0, tl.exp2(tl.ceil(tl.log2(amax)) - 15.0), 1.0)
    return (q32 * (1.0 / shift)).to(tl.float16), qk_scale * shift


@triton.jit
def e4m3_pairs_to_fp16(pairs, ASM: tl.constexpr):
    """A ``[rows, cols]`` uint16 tile, each element two e4m3 values (little endian: the low byte is the even
    column), -> the ``[rows, 2 * cols]`` fp16 tile. ``ASM``: one packed ``cvt.rn.f16x2.e4m3x2`` per pair (sm_89+);
    otherwise the bytes are split and cast one by one (the interpreter, which has no inline assembly).

    The join + reshape keeps the compiler from moving the tile's layout conversion for the dot ahead of the
    conversion: the tile is then transposed for ``p @ v`` as 16-bit data (ldmatrix.trans) instead of byte by byte."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm="{ .reg .b32 t; cvt.rn.f16x2.e4m3x2 t, $2; mov.b32 {$0, $1}, t; }",
            constraints="=h,=h,h",
            args=[pairs],
            dtype=(tl.float16, tl.float16),
            is_pure=True,
            pack=1,
        )
    else:
        lo = (pairs & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        hi = (pairs >> 8).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return tl.reshape(tl.join(lo, hi), [pairs.shape[0], 2 * pairs.shape[1]])


@triton.jit
def load_kv_tile(ptrs, key_mask, dim_mask, MASK_KEYS: tl.constexpr, MASK_DIMS: tl.constexpr):
    """A K or V tile, masked only where needed: keys past the context (``MASK_KEYS``) and the padded head-dim
    columns (``MASK_DIMS``); the masks broadcast to the tile's shape. A whole unpadded tile loads unmasked."""
    if MASK_KEYS:
        if MASK_DIMS:
            x = tl.load(ptrs, mask=key_mask & dim_mask, other=0.0)
        else:
            x = tl.load(ptrs, mask=key_mask, other=0.0)
    elif MASK_DIMS:
        x = tl.load(ptrs, mask=dim_mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def attend_kv_tile(
    acc, m_i, l_i, q, q_pos, tile_start, kv_end, table, k_base, v_base, qk_scale, cap_log2, slopes, sliding_window,
    stride_kb, stride_ks, stride_vb, stride_vs,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    MASKED: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr,
    V_PAIRS: tl.constexpr, PAIRS_ASM: tl.constexpr, EMPTY_ROWS: tl.constexpr = False, SPLIT_V: tl.constexpr = False,
):  # fmt: skip
    """One key tile of online softmax for the rows of ``q`` (``[rows, BLOCK_D]``, positions ``q_pos``): gather the
    tile's K/V through the block table, convert them to q's dtype (an fp8 cache's tiles: to fp16 when q was made
    fp16 by :func:`queries_to_fp16`, V as packed pairs with ``V_PAIRS``, in two halves with ``SPLIT_V``; see
    :func:`fp8_read_flags`), score, mask (``MASKED`` tiles: causal, context end, window) and fold into
    ``(acc, m_i, l_i)``.

    Unmasked tiles must lie wholly below every row's position and inside the context (prefill's full tiles).
    ``EMPTY_ROWS``: a row may meet a whole tile of keys it must not see before any visible key (with ``WINDOW``
    always; the multi-query decode kernel's split-K, where a split may start after a row's causal limit), so the
    running maximum can still be -inf: guarded, no NaN."""
    V_HALVES: tl.constexpr = V_PAIRS and SPLIT_V and TILE_N >= 32  # p @ v over two halves of the keys (split_pv)
    offs_n, page, in_page, in_context, k, v = gather_kv_tile(
        tile_start, kv_end, table, k_base, v_base, stride_kb, stride_ks, stride_vb, stride_vs, HEAD_DIM, BLOCK_D,
        BLOCK_SIZE, TILE_N, MASKED, V_HALVES, V_PAIRS, PAIRS_ASM)
    # One branch or the other, no early return: Triton 3.9 compiles the statements after a constexpr branch's
    # return too, and the fold cannot take V in halves.
    if V_HALVES:
        p, alpha, m_new, l_i = _online_softmax(m_i, l_i, q, k, q_pos, offs_n, kv_end, qk_scale, cap_log2, slopes,
                                               sliding_window, MASKED, IEEE, SOFTCAP, ALIBI, WINDOW, EMPTY_ROWS)
        acc = split_pv(acc * alpha[:, None], p, v_base, page, in_page, in_context, stride_vb, stride_vs, HEAD_DIM,
                       BLOCK_D, TILE_N, MASKED, PAIRS_ASM)  # fmt: skip
    else:
        acc, m_new, l_i = fold_kv_tile(acc, m_i, l_i, q, k, v, q_pos, offs_n, kv_end, qk_scale, cap_log2, slopes,
                                       sliding_window, MASKED, IEEE, SOFTCAP, ALIBI, WINDOW, EMPTY_ROWS)  # fmt: skip
    return acc, m_new, l_i


@triton.jit
def gather_kv_tile(
    tile_start, kv_end, table, k_base, v_base, stride_kb, stride_ks, stride_vb, stride_vs,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    MASKED: tl.constexpr, SKIP_V: tl.constexpr = False, V_PAIRS: tl.constexpr = False, PAIRS_ASM: tl.constexpr = False,
):  # fmt: skip
    """The keys ``tile_start + [0, TILE_N)`` (those before ``kv_end`` when ``MASKED``) through the block table: their
    positions, pages, slots in the page, which are in context, the K tile ``[BLOCK_D, TILE_N]`` and the V tile
    ``[TILE_N, BLOCK_D]`` as stored (an fp8 V: as fp16 pairs with ``V_PAIRS``; with ``SKIP_V`` not read: the caller
    reads it in halves, and K stands in for it)."""
    offs_n = tile_start + tl.arange(0, TILE_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_context = offs_n < kv_end
    if MASKED:
        page = tl.load(table + offs_n // BLOCK_SIZE, mask=in_context, other=0).to(tl.int64)
    else:
        page = tl.load(table + offs_n // BLOCK_SIZE).to(tl.int64)
    in_page = offs_n % BLOCK_SIZE
    dim_ok = offs_d < HEAD_DIM
    k = load_kv_tile(k_base + (page * stride_kb + in_page * stride_ks)[None, :] + offs_d[:, None],
                     in_context[None, :], dim_ok[:, None], MASKED, BLOCK_D != HEAD_DIM)  # [BLOCK_D, TILE_N]
    if SKIP_V:
        v = k  # a placeholder (a jit function returns tensors): the caller reads V itself
    elif V_PAIRS:  # fp8 V read as uint16 pairs, converted to fp16 before its layout conversion (e4m3_pairs_to_fp16)
        v = load_v_pairs(v_base, page, in_page, in_context, stride_vb, stride_vs, HEAD_DIM, BLOCK_D, MASKED, PAIRS_ASM)
    else:
        v = load_kv_tile(v_base + (page * stride_vb + in_page * stride_vs)[:, None] + offs_d[None, :],
                         in_context[:, None], dim_ok[None, :], MASKED, BLOCK_D != HEAD_DIM)  # [TILE_N, BLOCK_D]
    return offs_n, page, in_page, in_context, k, v


@triton.jit
def _online_softmax(m_i, l_i, q, k, q_pos, offs_n, kv_end, qk_scale, cap_log2, slopes, sliding_window,
                    MASKED: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                    WINDOW: tl.constexpr, EMPTY_ROWS: tl.constexpr):  # fmt: skip
    """A tile's scores folded into the running maximum and sum: ``(p, alpha, m_new, l_i)``."""
    k = k.to(q.dtype)  # an fp8 tile: to fp16 (packed cvt) or q's dtype, see queries_to_fp16
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = transform_scores(s, qk_scale, cap_log2, slopes, q_pos, offs_n, SOFTCAP, ALIBI)
    if MASKED:
        s = mask_invisible(s, q_pos, offs_n, kv_end, sliding_window, WINDOW)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if WINDOW or EMPTY_ROWS:  # a row may meet a tile wholly invisible to it before any visible key: no NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def fold_kv_tile(acc, m_i, l_i, q, k, v, q_pos, offs_n, kv_end, qk_scale, cap_log2, slopes, sliding_window,
                 MASKED: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                 WINDOW: tl.constexpr, EMPTY_ROWS: tl.constexpr = False):  # fmt: skip
    """Online softmax over one gathered tile (:func:`gather_kv_tile`'s K and V, V not read in halves)."""
    p, alpha, m_new, l_i = _online_softmax(m_i, l_i, q, k, q_pos, offs_n, kv_end, qk_scale, cap_log2, slopes,
                                           sliding_window, MASKED, IEEE, SOFTCAP, ALIBI, WINDOW, EMPTY_ROWS)
    v = v.to(q.dtype)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def load_v_pairs(v_base, page, in_page, in_context, stride_vb, stride_vs, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, MASKED: tl.constexpr, PAIRS_ASM: tl.constexpr):  # fmt: skip
    """The fp8 V rows of the keys at ``(page, in_page)`` (1-D, one per key), read as uint16 pairs and converted to
    an fp16 ``[keys, BLOCK_D]`` tile (:func:`e4m3_pairs_to_fp16`)."""
    offs_p = tl.arange(0, BLOCK_D // 2)
    v_pairs = v_base.to(tl.pointer_type(tl.uint16)) + ((page * stride_vb + in_page * stride_vs) // 2)[:, None]
    return e4m3_pairs_to_fp16(load_kv_tile(v_pairs + offs_p[None, :], in_context[:, None],
                                           (offs_p < HEAD_DIM // 2)[None, :], MASKED, BLOCK_D != HEAD_DIM),
                              PAIRS_ASM)  # fmt: skip


@triton.jit
def split_pv(acc, p, v_base, page, in_page, in_context, stride_vb, stride_vs, HEAD_DIM: tl.constexpr,
             BLOCK_D: tl.constexpr, TILE_N: tl.constexpr, MASKED: tl.constexpr, PAIRS_ASM: tl.constexpr):  # fmt: skip
    """``acc + p @ v`` for an fp8 V tile in two halves, the even keys then the odd ones (``p``'s columns split by
    reshape, no data movement), each read as pairs and converted on its own: the fp16 tile that the dot stages in
    shared memory is half the size (at 128 keys and 4 warps, sm_90: 55 KB of shared memory per program against 74,
    so 4 programs fit on an SM with <= 128 registers; ``DecodeConfig.max_registers``)."""
    p_even, p_odd = tl.split(tl.reshape(p, [p.shape[0], TILE_N // 2, 2]))
    page_even, page_odd = tl.split(tl.reshape(page, [TILE_N // 2, 2]))
    slot_even, slot_odd = tl.split(tl.reshape(in_page, [TILE_N // 2, 2]))
    ctx_even, ctx_odd = tl.split(tl.reshape(in_context, [TILE_N // 2, 2]))
    v_even = load_v_pairs(v_base, page_even, slot_even, ctx_even, stride_vb, stride_vs, HEAD_DIM, BLOCK_D, MASKED,
                          PAIRS_ASM)  # fmt: skip
    acc += tl.dot(p_even.to(tl.float16), v_even)
    v_odd = load_v_pairs(v_base, page_odd, slot_odd, ctx_odd, stride_vb, stride_vs, HEAD_DIM, BLOCK_D, MASKED,
                         PAIRS_ASM)  # fmt: skip
    return acc + tl.dot(p_odd.to(tl.float16), v_odd)


def triton_supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Shapes the Triton kernels handle: any head dim (padded to a power of two), whole query groups, unit-stride
    last dims."""
    return q.shape[1] % k_cache.shape[2] == 0 and q.stride(-1) == 1 and k_cache.stride(-1) == 1


def check_attention_args(q, k_cache, v_cache, block_tables, out) -> torch.Tensor:
    """Raise on layouts the kernels do not handle; returns ``out``, or a new output when it is None."""
    if not triton_supports(q, k_cache):
        raise ValueError(f"unsupported shapes for the Triton attention: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have the same shape, dtype and unit last stride")
    if is_fp8_cache(k_cache) and q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"an fp8 KV cache is read into q's dtype, which must be a float type, got {q.dtype}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with unit last stride, got {tuple(out.shape)}")
    return out


# ------------------------------------------------------------------------------------------- reference building blocks


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int, *,
    k_scale: float = 1.0, v_scale: float = 1.0, dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``[B, max_len, Hk, D]`` copies of the first ``max_len`` cached positions of each sequence; an fp8
    cache comes back dequantized (times ``k_scale`` / ``v_scale``) in ``dtype``."""
    block_size, num_heads, head_dim = k_cache.shape[1:]
    num_blocks = -(-max_len // block_size)
    table = block_tables[:, :num_blocks].long()
    batch = table.shape[0]
    keys = k_cache[table].reshape(batch, num_blocks * block_size, num_heads, head_dim)[:, :max_len]
    values = v_cache[table].reshape(batch, num_blocks * block_size, num_heads, head_dim)[:, :max_len]
    if is_fp8_cache(k_cache):
        keys = dequantize_kv_ref(keys, k_scale, dtype or torch.float32)
        values = dequantize_kv_ref(values, v_scale, dtype or torch.float32)
    return keys, values


def visible_keys(query_pos: torch.Tensor, num_keys: int, sliding_window: int = 0) -> torch.Tensor:
    """Boolean ``[..., num_keys]`` mask of the keys each query position sees: causal, and with ``sliding_window`` W > 0
    only the last W positions (itself included), HF's ``kv_idx > q_idx - W``."""
    key_pos = torch.arange(num_keys, device=query_pos.device)
    mask = key_pos <= query_pos[..., None]
    if sliding_window > 0:
        mask &= key_pos > query_pos[..., None] - sliding_window
    return mask


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float, *,
    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None, query_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q`` ``[B, L, Hq, D]``, keys/values ``[B, S, Hk, D]``, boolean mask ``[B, L, S]`` -> ``[B, L, Hq, D]``.

    ``softcap`` > 0: scores become ``softcap * tanh(score / softcap)`` (Gemma 2). ``alibi_slopes`` ``[Hq]``: each head
    adds ``slope * (key_pos - query_pos)`` (``query_pos`` ``[B, L]`` then needed)."""
    num_q_heads, num_kv_heads = q.shape[2], keys.shape[2]
    if num_q_heads != num_kv_heads:
        repeat = num_q_heads // num_kv_heads
        keys = keys.repeat_interleave(repeat, dim=2)
        values = values.repeat_interleave(repeat, dim=2)
    qt, kt, vt = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
    if softcap <= 0 and alibi_slopes is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=scale)
        return out.transpose(1, 2)
    scores = (qt @ kt.transpose(-1, -2)) * scale  # [B, Hq, L, S]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        distance = torch.arange(keys.shape[1], device=q.device)[None, None, :] - query_pos[:, :, None]  # [B, L, S]
        scores = scores + alibi_slopes.to(scores.dtype)[None, :, None, None] * distance[:, None].to(scores.dtype)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees nothing gives zeros, as the kernels
    return (weights @ vt).transpose(1, 2)
