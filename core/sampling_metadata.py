"""Build the sampler's per-row tensors for one step from the requests that sample in it.

Only the features some row uses get tensors (a batch of plain temperature sampling builds one tensor), so the
common case costs a few microseconds of host time.
"""

from __future__ import annotations

import numpy as np
import torch

from core.request import Request
from core.sampler import Penalties, SamplingBatch


def build_sampling_batch(requests: list[Request], vocab_size: int, device: torch.device) -> SamplingBatch:
    params = [r.sampling_params for r in requests]
    temps = [0.0 if p.greedy else p.temperature for p in params]
    batch = SamplingBatch(
        temperature=torch.tensor(temps, dtype=torch.float32).to(device, non_blocking=True),
        all_greedy=all(t == 0.0 for t in temps),
        any_greedy=any(t == 0.0 for t in temps),
    )
    if any(p.top_k > 0 for p in params):
        batch.top_k = _to(device, [p.top_k for p in params], torch.int64)
    if any(p.top_p < 1.0 for p in params):
        batch.top_p = _to(device, [p.top_p for p in params], torch.float32)
    if any(p.min_p > 0.0 for p in params):
        batch.min_p = _to(device, [p.min_p for p in params], torch.float32)
    seeded = [i for i, r in enumerate(requests) if r.seed_key is not None and not params[i].greedy]
    if seeded:
        batch.seeded_rows = _to(device, seeded, torch.int64)
        batch.seed_keys = _to(device, [requests[i].seed_key for i in seeded], torch.int64)
        batch.seed_steps = _to(device, [requests[i].num_output_tokens for i in seeded], torch.int64)
    if any(p.logit_bias for p in params):
        rows, cols, vals = [], [], []
        for i, p in enumerate(params):
            for token, value in (p.logit_bias or {}).items():
                if 0 <= token < vocab_size:
                    rows.append(i), cols.append(token), vals.append(value)
        if rows:
            batch.logit_bias = (_to(device, rows, torch.int64), _to(device, cols, torch.int64),
                                _to(device, vals, torch.float32))
    banned_rows, banned_cols = [], []
    for i, r in enumerate(requests):
        if r.num_output_tokens < params[i].min_tokens:
            banned = set(r.stop_token_ids) | (set() if params[i].ignore_eos else set(r.eos_token_ids))
            banned_rows.extend([i] * len(banned)), banned_cols.extend(banned)
    if banned_rows:
        batch.banned = (_to(device, banned_rows, torch.int64), _to(device, banned_cols, torch.int64))
    if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
        batch.penalties = _penalties(requests, vocab_size, device)
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    if wanted:
        batch.max_num_logprobs = max(wanted)
    return batch


def _to(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _penalties(requests: list[Request], vocab_size: int, device: torch.device) -> Penalties:
    n = len(requests)

    def padded(lists: list[list[int]]) -> torch.Tensor:
        """Token ids padded with ``vocab_size`` (an extra column that is dropped below)."""
        width = max(1, max(len(x) for x in lists))
        arr = np.full((n, width), vocab_size, dtype=np.int64)
        for i, x in enumerate(lists):
            arr[i, : len(x)] = x
        return torch.from_numpy(arr).to(device)

    outputs = padded([r.output_token_ids for r in requests])
    counts = torch.zeros(n, vocab_size + 1, device=device)
    counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=torch.float32))
    seen = counts > 0
    seen.scatter_(1, padded([r.prompt_token_ids for r in requests]), True)
    params = [r.sampling_params for r in requests]

    def column(values: list[float]) -> torch.Tensor:
        return _to(device, values, torch.float32)[:, None]

    return Penalties(
        presence=column([p.presence_penalty for p in params]),
        frequency=column([p.frequency_penalty for p in params]),
        repetition=column([p.repetition_penalty for p in params]),
        output_counts=counts[:, :vocab_size],
        seen_mask=seen[:, :vocab_size],
    )
