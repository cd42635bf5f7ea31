"""What the decode and prefill attention kernels share: the layout they accept, the argument checks, the softmax
constant, and the torch pieces their references are built from.

Layout (both kernels): sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` (its ``q_len``
new tokens, at positions ``seq_lens[i] - q_len .. seq_lens[i] - 1``) and reads keys/values of positions
``0 .. seq_lens[i] - 1`` from the cache through ``block_tables[i]`` (the new tokens were written there first). GQA:
query head ``h`` reads KV head ``h // (Hq // Hk)``. ``q`` is ``[T, Hq, D]``; caches ``[num_blocks, block_size, Hk, D]``.

Both kernels serve all query heads of one KV head per program ("GQA packing"): the K/V tiles are read once per KV
head and multiplied against the whole query group with one tl.dot. Softmax runs in the log2 domain (exp2) with the
scale folded into ``scale * LOG2E``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


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


def triton_supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Shapes the Triton kernels handle: power-of-two head dim >= 16, whole query groups, unit-stride last dims."""
    head_dim = q.shape[-1]
    return (
        head_dim >= 16
        and head_dim & (head_dim - 1) == 0
        and q.shape[1] % k_cache.shape[2] == 0
        and q.stride(-1) == 1
        and k_cache.stride(-1) == 1
    )


def check_attention_args(q, k_cache, v_cache, block_tables, out) -> torch.Tensor:
    """Raise on layouts the kernels do not handle; returns ``out``, or a new output when it is None."""
    if not triton_supports(q, k_cache):
        raise ValueError(f"unsupported shapes for the Triton attention: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have the same shape, dtype and unit last stride")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with unit last stride, got {tuple(out.shape)}")
    return out


# ------------------------------------------------------------------------------------------- reference building blocks


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``[B, max_len, Hk, D]`` copies of the first ``max_len`` cached positions of each sequence."""
    block_size, num_heads, head_dim = k_cache.shape[1:]
    num_blocks = -(-max_len // block_size)
    table = block_tables[:, :num_blocks].long()
    batch = table.shape[0]
    keys = k_cache[table].reshape(batch, num_blocks * block_size, num_heads, head_dim)[:, :max_len]
    values = v_cache[table].reshape(batch, num_blocks * block_size, num_heads, head_dim)[:, :max_len]
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
