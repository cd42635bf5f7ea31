"""The proposer an engine uses, picked from its ``SpeculativeConfig``: each turns the sequences that just sampled
into their drafts for the next step. The draft model (``draft_model.DraftModelProposer``) also takes the number of
drafts each sequence has reserved slots for, and the block tables."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from core.sequence import Sequence
from core.spec_decode.draft_model import DraftModelProposer
from core.spec_decode.ngram import NgramProposer
from ipc.config import SpeculativeConfig

if TYPE_CHECKING:
    from core.model_runner import ModelRunner


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence]) -> list[list[int]]: ...

    def remove(self, keys: list[tuple[str, int]]) -> None: ...


class NgramSequenceProposer:
    """``NgramProposer`` over ``Sequence`` objects."""

    def __init__(self, spec: SpeculativeConfig, max_num_seqs: int, max_model_len: int) -> None:
        self.ngram = NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max,
                                   max_num_seqs, max_model_len)

    def propose(self, seqs: list[Sequence]) -> list[list[int]]:
        return self.ngram.propose([(seq.key, seq.all_token_ids) for seq in seqs])

    def remove(self, keys: list[tuple[str, int]]) -> None:
        self.ngram.remove(keys)


def make_proposer(spec: SpeculativeConfig, runner: "ModelRunner") -> Proposer | DraftModelProposer:
    if spec.method == "ngram":
        return NgramSequenceProposer(spec, runner.max_num_seqs, runner.max_model_len)
    assert runner.draft is not None, "the runner loads the draft model of a draft_model config"
    return runner.draft
