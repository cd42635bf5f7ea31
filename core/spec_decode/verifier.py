"""The runner's side of a speculative step: a sampling batch with one row per verified position, the rejection
sampler over it, and the emitted tokens (and their logprobs) read back with the step's one device -> host copy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.host_copy import to_device
from core.sampler import Sampler, gather_logprobs
from core.sampling_metadata import build_sampling_batch
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
    rows: list[_PositionRow] = []
    row_output_indices: list[int] = []
    for seq, seq_drafts, output_index in zip(seqs, drafts, output_indices):
        # Only penalties and bad words of several tokens read the output tokens: other rows are the sequence
        # itself (no per-row copies).
        penalised = seq.sampling_params.reads_output_tokens
        for j in range(len(seq_drafts) + 1):
            rows.append(_PositionRow(seq, seq_drafts[:j]) if penalised else seq)
            row_output_indices.append(output_index + j)
    batch = build_sampling_batch(rows, vocab_size, device, row_output_indices, step_key)  # type: ignore[arg-type]
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
