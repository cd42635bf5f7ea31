"""Turn the last-position logits of a batch into next tokens, all on the device, one code path per feature used.

Order: the grammar bitmask (structured outputs), logit_bias, allowed_token_ids and banned-token masks (min_tokens,
bad_words), penalties, (raw logprobs), then for random rows temperature, top-k, top-p, min-p (only when some row uses
them: masked tokens become -inf), then one fused Gumbel-max pass (``kernels.sampling.gumbel_argmax``):
``argmax(logits / T + G)``, equivalent to sampling from softmax(logits / T). Greedy rows take the argmax.

Every row's noise is a counter-based hash of (key, step, token id), the same on every device: seeded rows use
(their seed's key, output index), so they give the same tokens whatever else is in the batch, after a preemption,
and on any device; unseeded rows use keys the runner derives from a per-step engine key (see
``core.sampling_metadata``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.structured_output.bitmask import apply_token_bitmask
from kernels.backend import check_backend, use_triton
from kernels.sampling import gumbel_argmax


@dataclass
class SamplingBatch:
    """Per-row sampling parameters for one step; ``None`` fields mean no row uses the feature."""

    temperature: torch.Tensor  # [N] float32; rows with 0 are greedy
    all_greedy: bool
    keys: torch.Tensor  # [N] int64 holding 32-bit noise keys (seed key, or derived from the step key)
    steps: torch.Tensor  # [N] int64 noise counters (seeded rows: output index of the sampled token; others: 0)
    top_k: torch.Tensor | None = None  # [N] int64, 0 = off
    top_p: torch.Tensor | None = None  # [N] float32, 1 = off
    min_p: torch.Tensor | None = None  # [N] float32, 0 = off
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, token ids, values
    banned: tuple[torch.Tensor, torch.Tensor] | None = None  # rows, token ids (min_tokens' EOS/stop ids, bad_words)
    # allowed_token_ids: (restricted rows, rows, token ids): a restricted row may sample only its listed ids.
    allowed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    penalties: "Penalties | None" = None
    max_num_logprobs: int | None = None  # top-N to return for every row (rows that asked for fewer are cut later)
    # logprob_token_ids: [N, M] int64, each row's requested ids padded (with 0) to the longest list; rows that
    # asked for none hold padding. Their logprobs come back in ``SamplerOutput.requested_logprobs``.
    requested_token_ids: torch.Tensor | None = None
    # Constrained rows (ascending, as the structured-output manager lists them), their xgrammar bitmask [rows, V/32].
    grammar: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Penalties:
    presence: torch.Tensor  # [N, 1]
    frequency: torch.Tensor  # [N, 1]
    repetition: torch.Tensor  # [N, 1]
    output_counts: torch.Tensor  # [N, V] float32: occurrences of each token in the output
    seen_mask: torch.Tensor  # [N, V] bool: token in prompt or output (repetition penalty)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprob_token_ids: torch.Tensor | None = None  # [N, 1 + K]: sampled token, then the top K
    logprobs: torch.Tensor | None = None  # [N, 1 + K]
    ranks: torch.Tensor | None = None  # [N]: rank of the sampled token (1 = most likely)
    requested_logprobs: torch.Tensor | None = None  # [N, M]: logprobs of ``SamplingBatch.requested_token_ids``


class Sampler:
    """Stateless: all randomness comes from ``SamplingBatch.keys`` / ``steps``. ``kernel_backend`` picks the sampling
    kernel (kernels/backend.py)."""

    def __init__(self, kernel_backend: str = "auto") -> None:
        self.kernel_backend = check_backend(kernel_backend)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if self._grammar_only(logits, batch):
            # The bitmask is applied inside the sampling pass as the logits are read: one kernel for the step.
            return SamplerOutput(gumbel_argmax(logits, batch.temperature, batch.keys, batch.steps,
                                               backend=self.kernel_backend, bitmask=batch.grammar[1]))
        logits, raw_logprobs = self.process(logits, batch)
        if batch.all_greedy and not use_triton(logits, self.kernel_backend):
            sampled = logits.argmax(-1)
        elif batch.all_greedy:  # the sampling kernel's greedy rows: a split argmax, ~5x faster than torch's at N = 1
            sampled = gumbel_argmax(logits, batch.temperature, batch.keys, batch.steps, backend=self.kernel_backend)
        else:
            sampled = self._sample(logits, batch)

        out = SamplerOutput(sampled)
        if raw_logprobs is not None:
            out.logprob_token_ids, out.logprobs, out.ranks = gather_logprobs(
                raw_logprobs, sampled, batch.max_num_logprobs
            )
            if batch.requested_token_ids is not None:
                out.requested_logprobs = raw_logprobs.gather(-1, batch.requested_token_ids)
        return out

    @staticmethod
    def _grammar_only(logits: torch.Tensor, batch: SamplingBatch) -> bool:
        """Every row constrained (its rows ascending and one per row: rows 0..N-1, so mask row i is logits row i)
        and nothing else to apply between the mask and the sampling pass (no bias, token masks, penalties, logprobs
        or filters): the steady state of a batch of json_object requests. An all-greedy batch too on CUDA (the
        kernel takes the argmax of greedy rows); on CPU it keeps the plain argmax (the reference would draw noise
        for every row)."""
        return (batch.grammar is not None and (logits.is_cuda or not batch.all_greedy)
                and batch.grammar[0].numel() == logits.shape[0]
                and batch.logit_bias is None and batch.allowed is None and batch.banned is None
                and batch.penalties is None and batch.max_num_logprobs is None and batch.top_k is None
                and batch.top_p is None and batch.min_p is None)

    def process(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Grammar bitmask, bias, allowed-token masks, bans and penalties applied (float32), and the raw logprobs when
        some row wants logprobs. The grammar goes first: nothing it forbids may come back in (nor be a logprob)."""
        logits = logits.float()
        if batch.grammar is not None:
            apply_token_bitmask(logits, *batch.grammar, backend=self.kernel_backend)
        if batch.logit_bias is not None:
            rows, cols, values = batch.logit_bias
            logits.index_put_((rows, cols), values, accumulate=True)
        if batch.allowed is not None:
            logits = mask_to_allowed(logits, *batch.allowed)
        if batch.banned is not None:
            logits.index_put_(batch.banned, logits.new_full((1,), float("-inf")))  # a fill, not a host copy
        if batch.penalties is not None:
            logits = apply_penalties(logits, batch.penalties)
        raw_logprobs = logits.log_softmax(-1) if batch.max_num_logprobs is not None else None
        return logits, raw_logprobs

    def filtered(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Processed logits with top-k/top-p/min-p applied, and the temperature to sample them at (0 = greedy):
        Gumbel-max over these samples the row's distribution (the speculative verifier reads them too)."""
        temperature = batch.temperature
        if batch.top_k is not None or batch.top_p is not None or batch.min_p is not None:
            # The filters act on the tempered distribution: scale first, then sample the survivors at T = 1.
            # Greedy rows are divided by 1 (unchanged) and keep T = 0 (build_sampling_batch gives them no filters).
            greedy = temperature == 0
            logits = logits / torch.where(greedy, 1.0, temperature)[:, None]
            logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
            if batch.min_p is not None:
                logits = apply_min_p(logits, batch.min_p)
            temperature = (~greedy).float()
        return logits, temperature

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Random rows: Gumbel-max at their temperature; greedy rows (T == 0): argmax, in the same pass."""
        logits, temperature = self.filtered(logits, batch)
        return gumbel_argmax(logits, temperature, batch.keys, batch.steps, backend=self.kernel_backend)


def mask_to_allowed(
    logits: torch.Tensor, restricted_rows: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """allowed_token_ids: in each restricted row, every token but the listed ones becomes -inf (one mask build,
    whatever the number of rows)."""
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[restricted_rows] = False
    keep[rows, token_ids] = True
    return logits.masked_fill_(~keep, float("-inf"))


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """Repetition penalty on prompt+output tokens (HF/vLLM rule), then OpenAI presence/frequency on output tokens."""
    rep = torch.where(logits > 0, 1.0 / p.repetition, p.repetition)
    logits = torch.where(p.seen_mask, logits * rep, logits)
    return logits - p.frequency * p.output_counts - p.presence * (p.output_counts > 0).float()


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask to -inf what lies outside each row's top-k and nucleus top-p (ties with the k-th value are kept;
    the most likely token always survives)."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        kth = sorted_logits.gather(-1, (vocab - k)[:, None])
        mask |= sorted_logits < kth
    if top_p is not None:
        probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(-1)
        mask |= probs.cumsum(-1) <= (1 - top_p)[:, None]
        mask[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(-1)
    threshold = probs.amax(-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Column 0: the given tokens' logprobs; columns 1..k: the top-k; plus the given tokens' ranks."""
    chosen = logprobs.gather(-1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(-1) + 1
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        return torch.cat((token_ids[:, None], top_ids), 1), torch.cat((chosen, top_lp), 1), ranks
    return token_ids[:, None], chosen, ranks
