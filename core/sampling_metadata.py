"""Build the sampler's per-row tensors for one step from the sequences that sample in it.

Only the features some row uses get tensors (a batch of plain temperature sampling builds two: temperatures, and
noise keys + steps in one copy), so the common case costs a few microseconds of host time.

Noise keys: a seeded row uses its seed's key and the output index of the token being sampled as the step, so its
tokens depend on nothing else. An unseeded row ``i`` uses ``mix(step_key, i)`` and step 0, where ``step_key`` is a
32-bit value the runner draws each step from its own engine-seeded generator: runs with the same engine seed and
the same schedule repeat, and no two steps or rows share noise.
"""

from __future__ import annotations

import numpy as np
import torch

from core.host_copy import to_device
from core.sequence import Sequence
from core.sampler import Penalties, SamplingBatch


_M32 = 0xFFFFFFFF


def build_sampling_batch(
    seqs: list[Sequence], vocab_size: int, device: torch.device, output_indices: list[int], step_key: int
) -> SamplingBatch:
    """``output_indices[i]``: index, in sequence i's output, of the token this step samples (seeded rows' noise step
    and the min_tokens check). ``step_key``: this step's 32-bit engine key (unseeded rows' noise)."""
    params = [seq.sampling_params for seq in seqs]
    temps = [0.0 if p.greedy else p.temperature for p in params]
    noise = np.empty((2, len(seqs)), dtype=np.int64)
    noise[0] = unseeded_row_keys(step_key, len(seqs))
    noise[1] = 0
    for i, seq in enumerate(seqs):
        if seq.seed_key is not None:
            noise[0, i], noise[1, i] = seq.seed_key, output_indices[i]
    noise_t = to_device(noise, torch.int64, device)
    batch = SamplingBatch(
        temperature=to_device(temps, torch.float32, device),
        all_greedy=all(t == 0.0 for t in temps),
        keys=noise_t[0],
        steps=noise_t[1],
    )
    # Filters only for random rows: a greedy row takes the argmax of its logits whatever its top-k/p settings.
    sampled = [p for p, t in zip(params, temps) if t > 0.0]
    if any(p.top_k > 0 for p in sampled):
        batch.top_k = to_device([0 if t == 0.0 else p.top_k for p, t in zip(params, temps)], torch.int64, device)
    if any(p.top_p < 1.0 for p in sampled):
        batch.top_p = to_device([1.0 if t == 0.0 else p.top_p for p, t in zip(params, temps)], torch.float32, device)
    if any(p.min_p > 0.0 for p in sampled):
        batch.min_p = to_device([0.0 if t == 0.0 else p.min_p for p, t in zip(params, temps)], torch.float32, device)
    if any(p.logit_bias for p in params):
        rows, cols, vals = [], [], []
        for i, p in enumerate(params):
            for token, value in (p.logit_bias or {}).items():
                if 0 <= token < vocab_size:
                    rows.append(i), cols.append(token), vals.append(value)
        if rows:
            batch.logit_bias = (to_device(rows, torch.int64, device), to_device(cols, torch.int64, device),
                                to_device(vals, torch.float32, device))
    banned_rows, banned_cols = [], []
    for i, seq in enumerate(seqs):
        if output_indices[i] < params[i].min_tokens:
            banned = set(seq.stop_token_ids) | (set() if params[i].ignore_eos else set(seq.eos_token_ids))
            banned_rows.extend([i] * len(banned)), banned_cols.extend(banned)
    if any(p.uses_token_masks for p in params):
        _token_masks(batch, seqs, device, banned_rows, banned_cols)
    if banned_rows:
        batch.banned = (to_device(banned_rows, torch.int64, device), to_device(banned_cols, torch.int64, device))
    if any(p.uses_penalties for p in params):
        batch.penalties = _penalties(seqs, vocab_size, device)
    wanted = [p.logprobs for p in params if p.logprobs is not None and p.logprob_token_ids is None]
    if wanted:
        batch.max_num_logprobs = max(wanted)
    if any(p.logprob_token_ids for p in params):
        batch.max_num_logprobs = batch.max_num_logprobs or 0  # the sampled token's logprob and rank, at least
        lists = [p.logprob_token_ids or () for p in params]
        requested = np.zeros((len(lists), max(len(ids) for ids in lists)), dtype=np.int64)
        for i, ids in enumerate(lists):
            requested[i, : len(ids)] = ids
        batch.requested_token_ids = to_device(requested, torch.int64, device)
    return batch


def _token_masks(batch: SamplingBatch, seqs: list[Sequence], device: torch.device, banned_rows: list[int],
                 banned_cols: list[int]) -> None:
    """allowed_token_ids into ``batch.allowed``; bad_words into the banned (row, token) lists: a one-token word
    always, a longer word's last token when the output ends with the word's other tokens (vLLM's rule)."""
    restricted, allowed_rows, allowed_cols = [], [], []
    for i, seq in enumerate(seqs):
        p = seq.sampling_params
        if p.allowed_token_ids is not None:
            restricted.append(i)
            allowed_rows.extend([i] * len(p.allowed_token_ids)), allowed_cols.extend(p.allowed_token_ids)
        for word in p.bad_words_token_ids or ():
            prefix = len(word) - 1
            output = seq.output_token_ids
            if prefix == 0 or (len(output) >= prefix and list(output[-prefix:]) == word[:-1]):
                banned_rows.append(i), banned_cols.append(word[-1])
    if restricted:
        batch.allowed = (to_device(restricted, torch.int64, device), to_device(allowed_rows, torch.int64, device),
                         to_device(allowed_cols, torch.int64, device))


def unseeded_row_keys(step_key: int, num_rows: int) -> np.ndarray:
    """``fmix32(step_key ^ fmix32(i * golden))`` for rows ``i``: unrelated 32-bit keys per (step, row), as int64."""
    rows = np.arange(num_rows, dtype=np.uint32) * np.uint32(0x9E3779B9)  # wraps mod 2^32
    return _fmix32_np(np.uint32(step_key & _M32) ^ _fmix32_np(rows)).astype(np.int64)


def _fmix32_np(x: np.ndarray) -> np.ndarray:
    """murmur3's finalizer on uint32 arrays (products wrap)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def _penalties(seqs: list[Sequence], vocab_size: int, device: torch.device) -> Penalties:
    n = len(seqs)

    def padded(lists: list[list[int]]) -> torch.Tensor:
        """Token ids padded with ``vocab_size`` (an extra column that is dropped below)."""
        width = max(1, max(len(x) for x in lists))
        arr = np.full((n, width), vocab_size, dtype=np.int64)
        for i, x in enumerate(lists):
            arr[i, : len(x)] = x
        return to_device(arr, torch.int64, device)

    outputs = padded([seq.output_token_ids for seq in seqs])
    counts = torch.zeros(n, vocab_size + 1, device=device)
    counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=torch.float32))
    seen = counts > 0
    seen.scatter_(1, padded([seq.prompt_token_ids for seq in seqs]), True)
    params = [seq.sampling_params for seq in seqs]

    def column(values: list[float]) -> torch.Tensor:
        return to_device(values, torch.float32, device)[:, None]

    return Penalties(
        presence=column([p.presence_penalty for p in params]),
        frequency=column([p.frequency_penalty for p in params]),
        repetition=column([p.repetition_penalty for p in params]),
        output_counts=counts[:, :vocab_size],
        seen_mask=seen[:, :vocab_size],
    )
