"""Per-sequence grammar state for the engine core: which constrained sequences may be scheduled, their matchers,
and each step's token bitmask.

Life of a constrained sequence: ``add`` submits its constraint to the compiler thread; the scheduler skips it while
``holds`` says its grammar is compiling (other requests keep running); once compiled it gets a matcher, and each
step ``bitmask`` asks the matcher for the allowed next tokens; ``accept`` advances the matcher with the sampled token.
Matchers need the previous token to build the next mask, so the engine never schedules a constrained sequence's
sample while its previous token is still in flight (``EngineCore._needs_sampled_tokens``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import numpy as np
import torch

from core.host_copy import to_device
from core.sequence import Sequence
from core.structured_output.compiler import GrammarCompilerService

logger = logging.getLogger(__name__)

Key = tuple[str, int]


class StructuredOutputManager:
    def __init__(self, load_tokenizer_info: Callable[[], Any], vocab_size: int, max_num_seqs: int) -> None:
        self.vocab_size = vocab_size
        self.compiler = GrammarCompilerService(load_tokenizer_info)
        self._compiling: dict[Key, Future] = {}
        self._matchers: dict[Key, Any] = {}
        self._failures: list[tuple[Sequence, str]] = []
        self._num_words = -(-vocab_size // 32)
        self._host_bitmask: torch.Tensor | None = None
        self._max_rows = max_num_seqs

    # ------------------------------------------------------------------------------------------------ intake
    def add(self, seq: Sequence) -> None:
        """Start compiling ``seq``'s grammar (a cache hit is ready at once)."""
        self._compiling[seq.key] = self.compiler.submit(seq.sampling_params.structured_outputs)

    def holds(self, seq: Sequence) -> bool:
        """True while ``seq`` must stay waiting: its grammar is compiling (or failed: ``take_failures``)."""
        if seq.sampling_params.structured_outputs is None or seq.key in self._matchers:
            return False
        future = self._compiling.get(seq.key)
        if future is None:
            return False  # removed (finished) meanwhile
        if not future.done():
            return True
        del self._compiling[seq.key]
        try:
            compiled = future.result()
        except Exception as exc:  # a grammar the frontend's check let through
            self._failures.append((seq, str(exc)))
            return True
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(compiled)
        for token in seq.output_token_ids:  # a sequence that already has output (never today: kept safe)
            matcher.accept_token(token)
        self._matchers[seq.key] = matcher
        return False

    def take_failures(self) -> list[tuple[Sequence, str]]:
        failures, self._failures = self._failures, []
        return failures

    def wait_for_compile(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds for a grammar (the engine has nothing else to do)."""
        if self._compiling:
            wait(list(self._compiling.values()), timeout=timeout, return_when=FIRST_COMPLETED)

    def remove(self, key: Key) -> None:
        self._compiling.pop(key, None)
        self._matchers.pop(key, None)

    # ------------------------------------------------------------------------------------------------ step
    def bitmask(
        self, seqs: list[Sequence], device: torch.device, batch_rows: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, bitmask) for the constrained rows among ``seqs`` (the step's sampling sequences), or None.
        ``batch_rows[i]``: the sampling batch row of ``seqs[i]`` (default ``i``; a speculative step's verify batch
        has one row per verified position, and a constrained sequence has exactly one: it gets no drafts).

        Filled on the host by each row's matcher (C++, a few microseconds per row) and uploaded in one copy.
        """
        rows = [i for i, seq in enumerate(seqs) if seq.key in self._matchers]
        if not rows:
            return None
        if self._host_bitmask is None or self._host_bitmask.shape[0] < len(rows):
            self._host_bitmask = torch.empty(max(self._max_rows, len(rows)), self._num_words, dtype=torch.int32)
        host = self._host_bitmask
        for slot, row in enumerate(rows):
            matcher = self._matchers[seqs[row].key]
            if matcher.is_terminated():  # ignore_eos past the grammar's end: allow anything rather than nothing
                host[slot].fill_(-1)
            else:
                matcher.fill_next_token_bitmask(host, slot)
        out_rows = rows if batch_rows is None else [batch_rows[i] for i in rows]
        return (to_device(out_rows, torch.int64, device),
                to_device(np.array(host[: len(rows)].numpy()), torch.int32, device))

    def accept(self, seq: Sequence, token: int) -> None:
        """Advance ``seq``'s matcher with its sampled token."""
        matcher = self._matchers.get(seq.key)
        if matcher is None or matcher.is_terminated():
            return
        if not matcher.accept_token(token):
            logger.error("Grammar rejected token %d of %s: the bitmask and the sampler disagree.", token, seq)

    def shutdown(self) -> None:
        self.compiler.shutdown()
