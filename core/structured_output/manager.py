"""Per-sequence grammar state for the engine core: which constrained sequences may be scheduled, their matchers,
and each step's token bitmask.

Life of a constrained sequence: ``add`` submits its constraint to the compiler thread; the scheduler skips it while
``holds`` says its grammar is compiling (other requests keep running); once compiled it gets a matcher, and each
step ``bitmask`` fills the allowed next tokens of every constrained row in one batched, multi-threaded xgrammar call
into a pinned buffer, uploaded in one non-blocking copy; ``accept`` advances the matchers with the sampled tokens in
one batched call. Sequences without a constraint never reach xgrammar.

A mask needs the previous token accepted. With async scheduling the engine launches step N's forward first, then
finishes step N-1 (its tokens reach the matchers) and only then asks for step N's mask (``ModelRunner.launch``'s
``before_sample``): the host's mask work overlaps the device's forward instead of serialising the steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import torch

from core.host_copy import to_device
from core.sequence import Sequence
from core.structured_output.compiler import GrammarCompilerService

logger = logging.getLogger(__name__)

Key = tuple[str, int]


class StructuredOutputManager:
    def __init__(self, load_tokenizer_info: Callable[[], Any], vocab_size: int, max_num_seqs: int,
                 fill_threads: int | str = "auto") -> None:
        """``fill_threads``: xgrammar's thread count for the batched bitmask fill ("auto": half the hardware
        threads)."""
        self.vocab_size = vocab_size
        self.compiler = GrammarCompilerService(load_tokenizer_info)
        self._compiling: dict[Key, Future] = {}
        self._matchers: dict[Key, Any] = {}
        self._failures: list[tuple[Sequence, str]] = []
        self._num_words = -(-vocab_size // 32)
        self._max_rows = max_num_seqs
        self._fill_threads = fill_threads
        # True: one batched xgrammar call per step to fill, one to accept. False: a call per sequence (the reference
        # the batched path is tested against).
        self.batched = True
        self._batch_matcher: Any = None
        # Two pinned host buffers, alternated, each with the event of its last upload: a buffer is refilled only
        # once the copy that read it is done (in practice always, a step later: the wait costs nothing).
        self._host_buffers: list[torch.Tensor] = []
        self._upload_events: list[Any] = [None, None]
        self._num_uploads = 0

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

    @property
    def active(self) -> bool:
        """Some sequence has a matcher: a step may need a mask."""
        return bool(self._matchers)

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

        Filled on the host for every constrained row in one batched xgrammar call (C++ threads), uploaded from
        pinned memory in one non-blocking copy: no sync, no per-row Python beyond collecting the matchers.
        """
        rows: list[int] = []
        matchers: list[Any] = []
        get = self._matchers.get
        for i, seq in enumerate(seqs):
            matcher = get(seq.key)
            if matcher is not None:
                rows.append(i)
                matchers.append(matcher)
        if not rows:
            return None
        host = self._host_buffer(len(rows), device)
        # A terminated matcher (ignore_eos past the grammar's end, or a sequence finished while this step was in
        # flight) has no next-token mask: allow anything rather than nothing.
        live = [slot for slot, matcher in enumerate(matchers) if not matcher.is_terminated()]
        if len(live) < len(rows):
            host[: len(rows)].fill_(-1)
        if self.batched:
            if live:
                self._batcher().batch_fill_next_token_bitmask([matchers[slot] for slot in live], host, live)
        else:
            for slot in live:
                matchers[slot].fill_next_token_bitmask(host, slot)
        out_rows = rows if batch_rows is None else [batch_rows[i] for i in rows]
        return to_device(out_rows, torch.int64, device), self._upload(host[: len(rows)], device)

    def accept(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Advance the matchers of ``seqs`` (constrained or not: the others are skipped) with their sampled tokens,
        in one batched call."""
        matchers: list[Any] = []
        accepted: list[int] = []
        for seq, token in zip(seqs, tokens):
            matcher = self._matchers.get(seq.key)
            if matcher is not None and not matcher.is_terminated():
                matchers.append(matcher)
                accepted.append(token)
        if not matchers:
            return
        if self.batched:
            import xgrammar as xgr

            ok = xgr.BatchGrammarMatcher.batch_accept_token(matchers, accepted)
        else:
            ok = [matcher.accept_token(token) for matcher, token in zip(matchers, accepted)]
        if not all(ok):
            bad = [token for token, good in zip(accepted, ok) if not good]
            logger.error("Grammar rejected sampled tokens %s: the bitmask and the sampler disagree.", bad[:8])

    def _batcher(self) -> Any:
        if self._batch_matcher is None:
            import xgrammar as xgr

            self._batch_matcher = xgr.BatchGrammarMatcher(max_threads=self._fill_threads)
        return self._batch_matcher

    def _host_buffer(self, num_rows: int, device: torch.device) -> torch.Tensor:
        """The next pinned [max rows, words] int32 buffer, once its previous upload has finished."""
        if not self._host_buffers or self._host_buffers[0].shape[0] < num_rows:
            pin = device.type == "cuda"
            size = max(self._max_rows, num_rows)
            self._host_buffers = [torch.empty(size, self._num_words, dtype=torch.int32, pin_memory=pin)
                                  for _ in range(2)]
            self._upload_events = [None, None]
        index = self._num_uploads % 2
        if self._upload_events[index] is not None:
            self._upload_events[index].synchronize()
        return self._host_buffers[index]

    def _upload(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        index = self._num_uploads % 2
        self._num_uploads += 1
        if device.type != "cuda":
            return host.clone()  # the buffer is refilled two steps on
        out = host.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._upload_events[index] = event
        return out

    def shutdown(self) -> None:
        self.compiler.shutdown()
