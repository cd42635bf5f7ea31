"""Sampling as one pass over the logits: Gumbel-max with counter-based hash noise.

Every random row is sampled as ``argmax(logits / T + G)`` with Gumbel noise ``G = -log(E)``, ``E = -log(u)``, where
``u`` comes from a hash of (row key, step, token id). That is the exponential race ``argmax(softmax(logits / T) / E)``
in log space: the same distribution, no softmax, and the noise is a pure function of its counters, so it is identical
on every device and in any batch composition. Greedy rows (``T == 0``) take ``argmax(logits)``. Ties go to the lowest
token id, as in ``torch.argmax``.

The noise contract (``noise_bits_ref`` / ``gumbel_from_bits_ref``), bit for bit for the integers:

* row key ``k = fmix32(key ^ fmix32(step * 0x9E3779B9))`` (32-bit wrapping arithmetic, murmur3's finalizer);
* token bits ``m = fmix32(fmix32(k ^ (token * 0x27D4EB2F)) ^ k)``;
* ``u = (m + 1/2) / 2^32``. Computed as ``t = min(u, 1 - u)`` from the integer (exact to float32 rounding), so that
  ``E`` keeps full relative precision at both ends: ``E = -log(t)`` for ``u <= 1/2``, ``E = -log1p(-t)`` above
  (a short series below t = 1/16, where ``log(1 - t)`` would cancel). ``E`` is never 0 or inf: ``G`` lies in
  [-3.2, 22.9] (a float32 ``u`` built directly would round to 1.0 for the top 2^-25 of hashes and give ``E = 0``).

The Triton kernel computes the same scores in one read of the logits: a program per (row, vocabulary chunk), each
keeping a running per-lane best, then a tiny reduce over the chunks when a row is split. It matches the reference
token whenever the best two scores are not within float rounding (its ``log`` may differ from torch's in the last
bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice as cuda_libdevice

from kernels.backend import num_sms, use_triton
from kernels.pdl import launch_options, use_pdl, wait_then_release
from kernels.token_bitmask import apply_token_bitmask_ref

_M32 = 0xFFFFFFFF
_STEP_MIX = 0x9E3779B9
_TOKEN_MIX = 0x27D4EB2F
_TWO_POW_M32 = 2.0**-32
_SERIES_BELOW = 0.0625  # t below this: -log1p(-t) by its series (terms to t^6, relative error < 1e-8)
DEFAULT_BLOCK = 2048
PROGRAMS_PER_SM = 4


# ------------------------------------------------------------------------------------------------ torch reference


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finalizer on int64 tensors holding 32-bit values (products wrap; the low 32 bits stay right)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def row_keys_ref(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The per-(key, step) 32-bit key, as int64 ``[N]``."""
    return _fmix32((keys & _M32) ^ _fmix32(((steps & _M32) * _STEP_MIX) & _M32))


def noise_bits_ref(keys: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The 32-bit hash of (key, step, token id) for every row and token, as int64 ``[N, V]``."""
    k = row_keys_ref(keys.long(), steps.long())[:, None]
    cols = (torch.arange(vocab_size, device=keys.device, dtype=torch.int64) * _TOKEN_MIX) & _M32
    return _fmix32(_fmix32(k ^ cols[None, :]) ^ k)


def gumbel_from_bits_ref(bits: torch.Tensor) -> torch.Tensor:
    """Gumbel noise ``-log(-log(u))``, ``u = (bits + 1/2) / 2^32``, float32 (see the module docstring)."""
    upper = bits >= 2**31
    c = torch.where(upper, _M32 - bits, bits)
    t = (c.float() + 0.5) * _TWO_POW_M32
    log_w = torch.log(torch.where(upper, 1.0 - t, t))
    series = t * (1.0 + t * (1.0 / 2 + t * (1.0 / 3 + t * (1.0 / 4 + t * (1.0 / 5 + t * (1.0 / 6))))))
    e = torch.where(upper & (t < _SERIES_BELOW), series, -log_w)
    return -torch.log(e)


def gumbel_noise_ref(keys: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel noise ``[N, V]`` float32 that depends only on (key, step, token id)."""
    return gumbel_from_bits_ref(noise_bits_ref(keys, steps, vocab_size))


def gumbel_scores_ref(
    logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    """What each row takes the argmax of: ``logits * (1 / T) + G``, or ``logits`` for greedy rows."""
    logits = logits.float()
    greedy = (temperature == 0)[:, None]
    inv_t = (1.0 / torch.where(temperature == 0, 1.0, temperature).float())[:, None]
    noisy = logits * inv_t + gumbel_noise_ref(keys, steps, logits.shape[-1])
    return torch.where(greedy, logits, noisy)


def gumbel_argmax_ref(
    logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor,
    bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The contract: token ids ``[N]`` int64. ``logits [N, V]``, ``temperature [N]`` (0 = greedy), ``keys``/``steps``
    ``[N]`` int64 (keys hold 32-bit values). Masked tokens are ``-inf`` in ``logits``. ``bitmask``: a grammar's
    token bitmask for every row (xgrammar's layout, ``[N, >= ceil(V / 32)]`` int32, see ``kernels.token_bitmask``):
    the tokens whose bit is 0 are masked too."""
    if bitmask is not None:
        logits = apply_token_bitmask_ref(logits.float().clone(), torch.arange(logits.shape[0], device=logits.device),
                                         bitmask)
    return gumbel_scores_ref(logits, temperature, keys, steps).argmax(-1)


# ------------------------------------------------------------------------------------------------ Triton


@triton.jit
def _fmix32_tl(x):
    """murmur3's finalizer on uint32 (products wrap mod 2^32)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _row_key_tl(key_ptr, step_ptr, row):
    key = tl.load(key_ptr + row).to(tl.uint32)
    step = tl.load(step_ptr + row).to(tl.uint32)
    return _fmix32_tl(key ^ _fmix32_tl(step * 0x9E3779B9))


@triton.jit
def _noise_bits_tl(row_key, tokens):
    """Hash bits (uint32) of ``tokens`` (int32 or int64 ids) under ``row_key``."""
    cols = tokens.to(tl.uint32) * 0x27D4EB2F
    return _fmix32_tl(_fmix32_tl(row_key ^ cols) ^ row_key)


@triton.jit
def _ln(x, FAST_LOG: tl.constexpr):
    """Natural log. ``FAST_LOG``: the hardware ``lg2.approx`` (one MUFU op instead of libdevice's ~20-instruction
    polynomial; 2 ulp, or 2^-22.6 absolute in [0.5, 2]). Every log here either feeds an additive Gumbel score or
    has its argument away from 1, so that error stays at the scores' float rounding."""
    if FAST_LOG:
        return cuda_libdevice.fast_log2f(x) * 0.6931471805599453
    else:
        return tl.log(x)


@triton.jit
def _gumbel_from_bits_tl(bits, FAST_LOG: tl.constexpr):
    """``gumbel_from_bits_ref`` in Triton (same operations in the same order)."""
    upper = bits >= 0x80000000
    c = tl.where(upper, 0xFFFFFFFF - bits, bits)
    t = (c.to(tl.float32) + 0.5) * 2.3283064365386963e-10
    log_w = _ln(tl.where(upper, 1.0 - t, t), FAST_LOG)
    series = t * (1.0 + t * (0.5 + t * (1.0 / 3 + t * (0.25 + t * (0.2 + t * (1.0 / 6))))))
    e = tl.where(upper & (t < 0.0625), series, -log_w)
    return -_ln(e, FAST_LOG)


@triton.jit(do_not_specialize=["chunk", "num_splits"])  # one compiled kernel whatever the batch size
def _gumbel_argmax_kernel(
    logits_ptr,
    stride_row,
    temperature_ptr,
    key_ptr,
    step_ptr,
    token_ptr,
    part_value_ptr,
    part_index_ptr,
    bitmask_ptr,
    bitmask_stride,
    vocab_size,
    chunk,
    num_splits,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
    FAST_LOG: tl.constexpr,
    HAS_BITMASK: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """One (row, chunk of ``chunk`` tokens): the best score and its lowest token id, written to the partials
    (``SPLIT``) or straight to ``token_ptr``. ``HAS_BITMASK``: row ``row``'s grammar bitmask masks its tokens as
    they are read (no separate pass writing -inf into the logits)."""
    wait_then_release(USE_PDL)
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = split * chunk
    end = tl.minimum(start + chunk, vocab_size)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temperature)
    row_key = _row_key_tl(key_ptr, step_ptr, row)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = start + lanes
    for offset in range(start, end, BLOCK):
        tokens = offset + lanes
        x = tl.load(row_ptr + tokens, mask=tokens < end, other=float("-inf")).to(tl.float32)
        if HAS_BITMASK:
            words = tl.load(bitmask_ptr + row.to(tl.int64) * bitmask_stride + tokens // 32, mask=tokens < end,
                            other=0)
            x = tl.where(((words >> (tokens % 32)) & 1) != 0, x, float("-inf"))
        if greedy:
            score = x
        else:
            score = x * inv_t + _gumbel_from_bits_tl(_noise_bits_tl(row_key, tokens), FAST_LOG)
        better = score > best  # strict: a lane keeps its first (lowest) token on ties
        best = tl.where(better, score, best)
        best_index = tl.where(better, tokens, best_index)
    top = tl.max(best, 0)
    index = tl.min(tl.where(best == top, best_index, 0x7FFFFFFF), 0)
    if SPLIT:
        tl.store(part_value_ptr + row * num_splits + split, top)
        tl.store(part_index_ptr + row * num_splits + split, index)
    else:
        tl.store(token_ptr + row, index.to(tl.int64))


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_splits_kernel(part_value_ptr, part_index_ptr, token_ptr, num_splits, BLOCK_S: tl.constexpr,
                          USE_PDL: tl.constexpr = False):  # fmt: skip
    """Best chunk of a row; ties go to the lowest chunk (= lowest token id, chunks are in vocabulary order)."""
    wait_then_release(USE_PDL)
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    mask = s < num_splits
    values = tl.load(part_value_ptr + row * num_splits + s, mask=mask, other=float("-inf"))
    indices = tl.load(part_index_ptr + row * num_splits + s, mask=mask, other=0x7FFFFFFF)
    top = tl.max(values, 0)
    tl.store(token_ptr + row, tl.min(tl.where(mask & (values == top), indices, 0x7FFFFFFF), 0).to(tl.int64))


@triton.jit
def _noise_kernel(key_ptr, step_ptr, bits_ptr, noise_ptr, vocab_size, BLOCK: tl.constexpr, FAST_LOG: tl.constexpr):
    """The kernel's own noise, written out ``[N, V]`` (tests compare it with the reference)."""
    row = tl.program_id(0)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = tokens < vocab_size
    bits = _noise_bits_tl(_row_key_tl(key_ptr, step_ptr, row), tokens)
    out = row.to(tl.int64) * vocab_size + tokens
    tl.store(bits_ptr + out, bits.to(tl.int64), mask=mask)
    tl.store(noise_ptr + out, _gumbel_from_bits_tl(bits, FAST_LOG), mask=mask)


def _fast_log(t: torch.Tensor) -> bool:
    """The PTX ``lg2.approx`` path: compiled NVIDIA kernels only (the interpreter runs CPU tensors)."""
    return t.is_cuda and torch.version.hip is None


def num_vocab_splits(num_rows: int, vocab_size: int, block: int, device_index: int | None) -> int:
    """Chunks per row so that about ``PROGRAMS_PER_SM`` programs per SM run (a single row at N=1 would leave all
    but one SM idle), never chunks smaller than one block."""
    wanted = max(1, PROGRAMS_PER_SM * num_sms(device_index) // max(num_rows, 1))
    return max(1, min(triton.cdiv(vocab_size, block), wanted))


def gumbel_argmax_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    keys: torch.Tensor,
    steps: torch.Tensor,
    *,
    block: int = DEFAULT_BLOCK,
    num_splits: int | None = None,
    bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``gumbel_argmax_ref`` in one pass over ``logits`` (float32/bf16/fp16, unit last stride), ``bitmask`` (every
    row's) applied as the logits are read. No host syncs: CUDA-graph safe. ``num_splits`` overrides the chunking
    (tests, benchmarks)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if bitmask is not None:
        if bitmask.shape[0] != logits.shape[0] or bitmask.shape[1] * 32 < logits.shape[1]:
            raise ValueError(f"a bitmask of shape {tuple(bitmask.shape)} does not cover logits {tuple(logits.shape)}")
        if bitmask.stride(-1) != 1:
            bitmask = bitmask.contiguous()
    num_rows, vocab_size = logits.shape
    tokens = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return tokens
    if num_splits is None:
        num_splits = num_vocab_splits(num_rows, vocab_size, block, logits.device.index if logits.is_cuda else None)
    chunk = triton.cdiv(triton.cdiv(vocab_size, num_splits), block) * block
    num_splits = triton.cdiv(vocab_size, chunk)
    split = num_splits > 1
    if split:
        part_values = torch.empty(num_rows, num_splits, dtype=torch.float32, device=logits.device)
        part_indices = torch.empty(num_rows, num_splits, dtype=torch.int32, device=logits.device)
    else:
        part_values = part_indices = tokens  # unused
    pdl = use_pdl(logits)
    _gumbel_argmax_kernel[(num_rows, num_splits)](
        logits, logits.stride(0), temperature, keys, steps, tokens, part_values, part_indices,
        tokens if bitmask is None else bitmask, 0 if bitmask is None else bitmask.stride(0),
        vocab_size, chunk, num_splits,
        SPLIT=split, BLOCK=block, FAST_LOG=_fast_log(logits), HAS_BITMASK=bitmask is not None,
        num_warps=8 if block >= 2048 else 4, **launch_options(pdl),
    )  # fmt: skip
    if split:
        _reduce_splits_kernel[(num_rows,)](
            part_values, part_indices, tokens, num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=1, **launch_options(pdl),
        )
    return tokens


def gumbel_noise_triton(
    keys: torch.Tensor, steps: torch.Tensor, vocab_size: int, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton side's hash bits (int64) and Gumbel noise (float32), ``[N, V]`` each: for tests."""
    n = keys.shape[0]
    bits = torch.empty(n, vocab_size, dtype=torch.int64, device=keys.device)
    noise = torch.empty(n, vocab_size, dtype=torch.float32, device=keys.device)
    _noise_kernel[(n, triton.cdiv(vocab_size, block))](
        keys, steps, bits, noise, vocab_size, BLOCK=block, FAST_LOG=_fast_log(keys)
    )
    return bits, noise


def gumbel_argmax(
    logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor, *, backend: str = "auto",
    bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled token ids ``[N]`` int64: the Triton kernel on CUDA unless ``backend`` is "torch", the reference
    otherwise (see ``gumbel_argmax_ref``; ``bitmask``: every row's grammar bitmask)."""
    if use_triton(logits, backend):
        return gumbel_argmax_triton(logits, temperature, keys, steps, bitmask=bitmask)
    return gumbel_argmax_ref(logits, temperature, keys, steps, bitmask)
