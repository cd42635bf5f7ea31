"""Verification of draft tokens against the target's distributions, all sequences at once on the device.

Each speculating sequence brings ``1 + k`` logits rows: row ``j`` is the target's next-token distribution after its
last known token and drafts ``d_1..d_j``. Rows are processed exactly as the sampler would (bias, min_tokens bans,
penalties seeing the drafts before them, temperature, top-k/p, min-p), then:

* greedy rows: accept the longest prefix where ``d_j == argmax p_j``; the token after it is ``argmax`` at the first
  mismatch (the bonus token when all drafts match);
* random rows: accept ``d_j`` with probability ``min(1, p_j(d_j) / q_j(d_j))``; on the first rejection sample from
  ``norm(max(0, p_j - q_j))``; when all are accepted, sample the bonus token from ``p_{k+1}``. The drafts here come
  from deterministic proposers (n-gram, greedy draft model), so ``q_j`` is one-hot and the residual is ``p_j``
  without the draft token. The emitted tokens are distributed exactly as the target's (Leviathan et al. 2023).

Randomness is the sampler's counter-based noise: row ``j`` of a seeded sequence uses (its seed key, output index of
the token at that position) for the Gumbel noise of the resample/bonus, and the same counters with a separate salt
for the acceptance uniform, so seeded requests are reproducible whatever else is in the batch.
"""

from __future__ import annotations

import torch

from kernels.sampling import gumbel_argmax, noise_bits_ref

_ACCEPT_SALT = 0x5BD1E995  # separates the acceptance uniforms' stream from the Gumbel noise's


def acceptance_uniforms(keys: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """A uniform in (0, 1) per row, from the hash of (key ^ salt, step, token id): float64 ``[R]``."""
    bits = noise_bits_ref((keys ^ _ACCEPT_SALT) & 0xFFFFFFFF, steps, 1)  # [R, 1]: token 0's bits
    bits = bits[:, 0] ^ ((token_ids.long() * 0x27D4EB2F) & 0xFFFFFFFF)
    return (bits.double() + 0.5) * 2.0**-32


def verify(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    keys: torch.Tensor,
    steps: torch.Tensor,
    draft_ids: torch.Tensor,
    num_drafts: torch.Tensor,
    *,
    all_greedy: bool = False,
    draft_probs: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted tokens for ``S`` sequences with up to ``K`` drafts each.

    ``logits [S, K+1, V]``: processed (filters applied; ``-inf`` = excluded) at temperature ``temperature [S]``
    (0 = greedy). ``keys/steps [S, K+1]``: noise counters per position. ``draft_ids [S, K]``, ``num_drafts [S]``
    (positions past a sequence's drafts are ignored). ``draft_probs [S, K, V]``: the draft distributions q (None:
    one-hot at the drafts). Returns ``tokens [S, K+1]`` (the first ``count`` are emitted) and ``count [S]``, in
    ``1..num_drafts+1``.
    """
    num_seqs, width, vocab = logits.shape
    k = width - 1
    device = logits.device
    valid = torch.arange(k, device=device)[None, :] < num_drafts[:, None]  # [S, K]
    drafts = torch.where(valid, draft_ids, 0).long()
    target_argmax = logits.argmax(-1)  # [S, K+1]
    if all_greedy:
        # Drafts equal to the argmax are accepted, and the token after them is the argmax too.
        accept = (drafts == target_argmax[:, :k]) & valid
        return target_argmax, accept.long().cumprod(1).sum(1) + 1

    greedy = temperature == 0
    inv_t = 1.0 / torch.where(greedy, 1.0, temperature)
    scaled = logits.float() * inv_t[:, None, None]  # [S, K+1, V]; p = softmax(scaled)
    draft_scores = scaled[:, :k].gather(-1, drafts[..., None])[..., 0]
    p_draft = (draft_scores - scaled[:, :k].logsumexp(-1)).double().exp()
    q_draft = 1.0 if draft_probs is None else draft_probs.gather(-1, drafts[..., None])[..., 0].double()
    u = acceptance_uniforms(keys[:, :k].reshape(-1), steps[:, :k].reshape(-1), drafts.reshape(-1)).view(num_seqs, k)
    accept_random = u * q_draft < p_draft  # u < p / q without dividing by a zero q
    accept = torch.where(greedy[:, None], drafts == target_argmax[:, :k], accept_random) & valid
    num_accepted = accept.long().cumprod(1).sum(1)  # the leading run of accepted drafts

    # The token after the run: from norm(max(0, p - q)) at a draft position, from p at the bonus position.
    if draft_probs is None:
        rows = scaled.clone()
        rows[:, :k].scatter_(-1, drafts[..., None], float("-inf"))  # p without the draft token
        rows[:, :k] = torch.where(valid[..., None], rows[:, :k], scaled[:, :k])
    else:
        residual = (scaled[:, :k].softmax(-1) - draft_probs.float()).clamp_min(0).log()
        rows = torch.cat((torch.where(valid[..., None], residual, scaled[:, :k]), scaled[:, k:]), 1)
    sampled = gumbel_argmax(rows.reshape(-1, vocab), (~greedy).float().repeat_interleave(width),
                            keys.reshape(-1), steps.reshape(-1), backend=backend).view(num_seqs, width)
    final = torch.where(greedy[:, None], target_argmax, sampled)
    tokens = torch.cat((drafts, drafts.new_zeros(num_seqs, 1)), 1)
    tokens.scatter_(1, num_accepted[:, None], final.gather(1, num_accepted[:, None]))
    return tokens, num_accepted + 1
