"""The runner's side of a speculative step: a sampling batch with one row per verified position, the rejection
sampler over it, and the emitted tokens (and their logprobs) read back with the step's one device -> host copy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.host_copy import to_device
from core.sampler import Sampler, SamplingBatch, gather_logprobs
from core.sampling_metadata import build_sampling_batch, unseeded_row_keys
from core.sequence import Sequence
from core.spec_decode.rejection_sampler import verify
from ipc.messages import Logprobs


class _PositionRow:
    """Sequence ``seq`` as seen at its ``j``-th verified position: its drafts before that position count as output
    (penalties), everything else is the sequence's. Duck-types what ``build_sampling_batch`` reads."""

    __slots__ = ("sampling_params", "seed_key", "stop_token_ids", "eos_token_ids", "prompt_token_ids",
                 "output_token_ids")

    def __init__(self, seq: Sequence, drafts_before: list[int]) -> None:
        self.sampling_params = seq.sampling_params
        self.seed_key = seq.seed_key
        self.stop_token_ids = seq.stop_token_ids
        self.eos_token_ids = seq.eos_token_ids
        self.prompt_token_ids = seq.prompt_token_ids
        self.output_token_ids = seq.output_token_ids + drafts_before if drafts_before else seq.output_token_ids


def _per_sequence_params(seq: Sequence, output_index: int) -> bool:
    """Whether every verified position of ``seq`` samples with the same parameters: nothing that depends on the
    position (min_tokens bans still due, penalties and bad words that read the drafts before it) or that
    ``position_sampling_batch``'s vectorised build leaves to ``build_sampling_batch`` (bias, masks, requested ids)."""
    p = seq.sampling_params
    return (not p.logit_bias and not p.uses_penalties and not p.uses_token_masks and not p.logprob_token_ids
            and output_index >= p.min_tokens)


def position_sampling_batch(
    seqs: list[Sequence], drafts: list[list[int]], num_drafts: np.ndarray, output_indices: list[int],
    vocab_size: int, device: torch.device, step_key: int,
) -> SamplingBatch:
    """The sampling batch with a row per verified position (``1 + len(drafts[i])`` rows for sequence ``i``), the same
    as ``build_sampling_batch`` over those positions. When no sequence has position-dependent parameters it is built
    from per-sequence arrays repeated per row (numpy, no per-row Python objects); otherwise row by row."""
    if not all(_per_sequence_params(seq, index) for seq, index in zip(seqs, output_indices)):
        rows: list = []
        row_output_indices: list[int] = []
        for seq, seq_drafts, output_index in zip(seqs, drafts, output_indices):
            # Only penalties and bad words of several tokens read the output tokens: other rows are the sequence
            # itself (no per-row copies).
            penalised = seq.sampling_params.reads_output_tokens
            for j in range(len(seq_drafts) + 1):
                rows.append(_PositionRow(seq, seq_drafts[:j]) if penalised else seq)
                row_output_indices.append(output_index + j)
        return build_sampling_batch(rows, vocab_size, device, row_output_indices, step_key)
    params = [seq.sampling_params for seq in seqs]
    widths = num_drafts + 1
    num_rows = int(widths.sum())
    seq_temps = np.array([0.0 if p.greedy else p.temperature for p in params], dtype=np.float32)
    sampled = seq_temps > 0
    first_row = np.cumsum(widths) - widths
    position = np.arange(num_rows) - np.repeat(first_row, widths)  # j: the row's verified position
    # Noise counters: unseeded rows (step key, row), step 0; seeded rows (seed key, output index of the position).
    seed_keys = np.array([-1 if seq.seed_key is None else seq.seed_key for seq in seqs], dtype=np.int64)
    row_seed = np.repeat(seed_keys, widths)
    seeded = row_seed >= 0
    # Filters only for random rows (as build_sampling_batch): a greedy row takes the argmax whatever its settings.
    use_top_k = any(p.top_k > 0 for p, s in zip(params, sampled) if s)
    ints = np.empty((3 if use_top_k else 2, num_rows), dtype=np.int64)
    ints[0] = np.where(seeded, row_seed, unseeded_row_keys(step_key, num_rows))
    ints[1] = np.where(seeded, np.repeat(np.asarray(output_indices, dtype=np.int64), widths) + position, 0)
    if use_top_k:
        ints[2] = np.repeat(np.array([p.top_k if s else 0 for p, s in zip(params, sampled)], dtype=np.int64), widths)
    columns = {"temperature": seq_temps}
    if any(p.top_p < 1.0 for p, s in zip(params, sampled) if s):
        columns["top_p"] = np.array([p.top_p if s else 1.0 for p, s in zip(params, sampled)], dtype=np.float32)
    if any(p.min_p > 0.0 for p, s in zip(params, sampled) if s):
        columns["min_p"] = np.array([p.min_p if s else 0.0 for p, s in zip(params, sampled)], dtype=np.float32)
    names = list(columns)
    floats = to_device(np.repeat(np.stack([columns[n] for n in names]), widths, axis=1), torch.float32, device)
    ints_t = to_device(ints, torch.int64, device)
    batch = SamplingBatch(temperature=floats[0], all_greedy=not sampled.any(), keys=ints_t[0], steps=ints_t[1])
    if use_top_k:
        batch.top_k = ints_t[2]
    for i, name in enumerate(names[1:], 1):
        setattr(batch, name, floats[i])
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    if wanted:
        batch.max_num_logprobs = max(wanted)
    return batch


@dataclass
class VerifiedStep:
    """Device results of a speculative step; ``result()`` reads them with one copy."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # [S, K+1]
    counts: torch.Tensor  # [S]
    row_starts: list[int]  # first logits row of each sequence
    logprob_ids: torch.Tensor | None
    logprobs: torch.Tensor | None
    ranks: torch.Tensor | None

    def result(self) -> tuple[list[list[int]], list[Logprobs | None]]:
        packed = torch.cat((self.tokens, self.counts[:, None]), 1).tolist()  # the step's one sync
        tokens = [row[: row[-1]] for row in packed]
        logprobs: list[Logprobs | None] = [None] * len(self.seqs)
        if self.logprobs is not None:
            ids, lps, ranks = self.logprob_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist()
            for i, seq in enumerate(self.seqs):
                k = seq.sampling_params.logprobs
                if k is None:
                    continue
                rows = range(self.row_starts[i], self.row_starts[i] + len(tokens[i]))
                logprobs[i] = Logprobs([ids[r][: k + 1] for r in rows], [lps[r][: k + 1] for r in rows],
                                       [ranks[r] for r in rows])
        return tokens, logprobs


def verify_step(
    sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]],
    output_indices: list[int], vocab_size: int, step_key: int,
    grammar: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> VerifiedStep:
    """``logits [R, V]``: ``1 + len(drafts[i])`` consecutive rows per sequence ``i`` (the last is the bonus
    position). Sequences without drafts sample as usual (their one row is the bonus position). ``grammar``: the
    structured-output bitmask, its rows being logits rows (constrained sequences have no drafts: one row each)."""
    device = logits.device
    num_drafts = np.fromiter((len(d) for d in drafts), dtype=np.int64, count=len(drafts))
    width = int(num_drafts.max()) + 1
    if logits.shape[0] != int(num_drafts.sum()) + len(drafts):  # a device index assert otherwise: name it here
        raise RuntimeError(f"verify_step: {logits.shape[0]} logits rows for {len(drafts)} sequences with "
                           f"{int(num_drafts.sum())} drafts")
    batch = position_sampling_batch(seqs, drafts, num_drafts, output_indices, vocab_size, device, step_key)
    batch.grammar = grammar
    processed, raw_logprobs = sampler.process(logits, batch)
    filtered, row_temperature = sampler.filtered(processed, batch)

    starts = np.zeros(len(seqs), dtype=np.int64)
    np.cumsum(num_drafts[:-1] + 1, out=starts[1:])
    index = starts[:, None] + np.minimum(np.arange(width)[None, :], num_drafts[:, None])  # [S, K+1]
    draft_matrix = np.zeros((len(seqs), max(width - 1, 1)), dtype=np.int64)
    for i, seq_drafts in enumerate(drafts):
        draft_matrix[i, : len(seq_drafts)] = seq_drafts
    host = np.concatenate((index.reshape(-1), draft_matrix[:, : width - 1].reshape(-1), num_drafts))
    packed = to_device(host, torch.int64, device)
    index_t = packed[: index.size].view(len(seqs), width)
    draft_t = packed[index.size : index.size + len(seqs) * (width - 1)].view(len(seqs), width - 1)
    num_drafts_t = packed[-len(seqs):]
    first_rows = index_t[:, 0]
    tokens, counts = verify(
        filtered[index_t], row_temperature[first_rows], batch.keys[index_t], batch.steps[index_t],
        draft_t, num_drafts_t, all_greedy=batch.all_greedy, backend=sampler.kernel_backend,
    )
    out = VerifiedStep(seqs, tokens, counts, starts.tolist(), None, None, None)
    if raw_logprobs is not None:
        # Every row's emitted token (rows past a sequence's count are computed and dropped on the host).
        seq_of_row = np.repeat(np.arange(len(seqs)), num_drafts + 1)
        pos_of_row = np.arange(len(seq_of_row)) - np.repeat(starts, num_drafts + 1)
        where = to_device(np.stack((seq_of_row, pos_of_row)), torch.int64, device)
        row_tokens = tokens[where[0], where[1]]
        out.logprob_ids, out.logprobs, out.ranks = gather_logprobs(raw_logprobs, row_tokens, batch.max_num_logprobs)
    return out
