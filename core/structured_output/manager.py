"""Per-sequence grammar state for the engine core: which constrained sequences may be scheduled, their matchers,
and each step's token bitmask.

Life of a constrained sequence: ``add`` submits its constraint to the compiler thread; the scheduler skips it while
``holds`` says its grammar is compiling (other requests keep running); once compiled it gets a matcher, advanced
with each sampled token, which gives the allowed next tokens as a bitmask. Sequences without a constraint never
reach xgrammar.

A step's grammar work (accept the previous step's tokens, then fill the masks) runs off the engine thread and
overlaps with everything else: as soon as step N-1's tokens are on the host (a non-blocking check at the top of
step N, before it is scheduled; a host-bound step finds them there), the engine hands them to ``prepare`` with
step N-1's live sequences, then schedules, plans and stages step N, queues its forward and does its Python
bookkeeping for step N-1 while the grammar thread advances and fills the constrained rows (one batched accept, one
fill on xgrammar's C++ threads, both without the GIL) straight into a pinned buffer; ``bitmask`` joins it, takes
step N's rows out of those masks (filling only rows that were not there: new or resumed sequences) and uploads
them in one non-blocking copy. The engine looks again after scheduling (then with step N's own sequences), after
planning and once step N's inputs are staged;
when step N-1 is still running on the device even then, the hand-off waits until step N's forward is queued
(``ModelRunner.launch``'s ``before_sample``) and overlaps only the bookkeeping. No sync with
the device, no per-row work on the engine thread beyond collecting the matchers.
On a machine with fewer than ``MIN_CPUS_FOR_GRAMMAR_THREADS`` CPUs the same batched calls run on the engine thread
(no core would be free to overlap them).
"""
from __future__ import annotations

import ctypes
import logging
import operator
import os
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch

from core.host_copy import to_device
from core.sequence import Sequence
from core.structured_output.compiler import GrammarCompilerService

logger = logging.getLogger(__name__)

Key = tuple[str, int]

_key_of = operator.attrgetter("key")  # ``map(_key_of, seqs)``: the keys of a step's rows at C speed


def default_grammar_threads() -> int:
    """Half the CPUs this process may use, at most 8: the engine thread keeps the rest."""
    return max(1, min(8, len(os.sched_getaffinity(0)) // 2))


MIN_CPUS_FOR_GRAMMAR_THREADS = 4

# xgrammar starts its fill threads for every call (a thread costs tens of microseconds to start and join, ~60 us seen
# for a second one on the dev box) while a row's mask takes ~2-4 us to fill, so a fill gets one thread per this many
# rows (up to the manager's ``_num_threads``): small batches, e.g. the tail of a workload, fill on one thread.
ROWS_PER_FILL_THREAD = 64


def fill_threads(num_rows: int, max_threads: int, rows_per_thread: int = ROWS_PER_FILL_THREAD) -> int:
    """Threads for a fill of ``num_rows`` masks: one per ``rows_per_thread`` rows, 1 to ``max_threads`` (0 rows per
    thread: always ``max_threads``)."""
    if rows_per_thread <= 0:
        return max_threads
    return max(1, min(max_threads, -(-num_rows // rows_per_thread)))

# CPython's switch interval while a grammar job is in flight: how long the grammar thread may wait for the GIL
# (to start, between its two C++ calls, and to finish) while the engine thread runs pure Python. The default 5 ms
# would serialise the job behind the engine's bookkeeping instead of overlapping it. A job takes the GIL three
# times, each after up to one interval, so the interval sets its latency (a job with two GIL-free calls of 0.1 ms
# each, beside 1 ms of engine Python, done after 1.25 ms at 200 us, 0.84 ms at 50 us), while the engine thread
# gives the GIL up the same three times whatever the interval (its Python took no longer at 50 us than at 200 us).
# Below the worker's short GIL-held stretches (tens of microseconds) the two threads would take the GIL back and
# forth.
GRAMMAR_SWITCH_INTERVAL_S = 0.00005


# PR_SET_TIMERSLACK (linux/prctl.h) and the slack asked for the grammar thread, in ns (Linux's default: 50 us).
_PR_SET_TIMERSLACK = 29
GRAMMAR_THREAD_TIMER_SLACK_NS = 1000


def precise_timed_waits() -> None:
    """Run on the grammar thread (Linux; elsewhere nothing): its timed waits end within 1 us of their timeout instead
    of Linux's default 50 us slack. A thread asking for the GIL waits one switch interval at a time, then asks the
    holder to drop it; with the default slack each 50 us wait took ~100 us, and a grammar job takes the GIL three
    times (start, between its accept and its fill, end), each while the engine thread runs Python. Measured on the
    dev box (a Python thread releasing the GIL for 0.1 ms, then taking it back from a busy thread): 0.32 ms for the
    round trip with the default slack, 0.21-0.23 ms with this one. The switch interval itself is unchanged."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_TIMERSLACK, GRAMMAR_THREAD_TIMER_SLACK_NS, 0, 0, 0)
    except (OSError, AttributeError):  # no libc to ask: the default slack stays
        logger.debug("could not set the grammar thread's timer slack", exc_info=True)


@dataclass
class _PreparedMasks:
    """Masks being filled on the grammar thread for one step's sampling sequences."""

    seqs: list[Sequence]
    keys: list[Key]  # the keys of ``seqs``: ``bitmask`` may be asked with another list of the same sequences
    rows: list[int]  # the constrained rows among ``seqs``
    host: torch.Tensor
    jobs: list[Future]
    removed: set[Key] = field(default_factory=set)  # keys removed since (a reused id's mask here is stale)


class StructuredOutputManager:
    def __init__(self, load_tokenizer_info: Callable[[], Any], vocab_size: int, max_num_seqs: int,
                 grammar_threads: int | None = None) -> None:
        """``grammar_threads``: at most this many xgrammar C++ threads fill the masks, each a share of the
        constrained rows, one per ``rows_per_fill_thread`` rows (default ``default_grammar_threads()``)."""
        self.vocab_size = vocab_size
        self.compiler = GrammarCompilerService(load_tokenizer_info)
        self._compiling: dict[Key, Future] = {}
        self._matchers: dict[Key, Any] = {}
        # What the batched xgrammar calls take for each matcher: its core handle (the calls then skip xgrammar's
        # Python wrappers, which rebuild the handle list row by row holding the GIL on the grammar thread), or the
        # matcher itself where xgrammar has no core binding for them.
        self._handles: dict[Key, Any] = {}
        # Sequences whose matcher accepted a stop token (it terminates exactly then: matchers are made without
        # ``terminate_without_stop_token``). Kept here so a step asks no matcher ``is_terminated()``: a row in it
        # allows anything (ignore_eos, or finished while the step was in flight) and accepts nothing more.
        self._ended: set[Key] = set()
        self._stop_token_ids: frozenset[int] = frozenset()  # the same for every grammar: one TokenizerInfo
        self._failures: list[tuple[Sequence, str]] = []
        self._num_words = -(-vocab_size // 32)
        self._max_rows = max_num_seqs
        self._num_threads = grammar_threads or default_grammar_threads()
        # Grammar threads only pay where a core is free to run them next to the engine thread (and the device
        # runtime's threads); on a small machine the same batched calls run on the engine thread instead.
        self.overlap = len(os.sched_getaffinity(0)) >= MIN_CPUS_FOR_GRAMMAR_THREADS
        self._pool: ThreadPoolExecutor | None = None  # the one grammar thread
        self.rows_per_fill_thread = ROWS_PER_FILL_THREAD
        self._fillers: dict[int, Any] = {}  # xgrammar BatchGrammarMatchers by their number of C++ threads
        self._saved_switch_interval = sys.getswitchinterval()
        # True: batched xgrammar calls (on the grammar thread when ``overlap``). False: one call per sequence on
        # the engine thread (the reference the batched path is tested against; ``--per-sequence`` in
        # benchmarks/structured_host_cost).
        self.batched = True
        self._prepared: _PreparedMasks | None = None
        self._arange: torch.Tensor | None = None  # row ids for a step whose every row is constrained
        self._arange_device: torch.device | None = None
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
        self._stop_token_ids = frozenset(matcher.stop_token_ids)
        for token in seq.output_token_ids:  # a sequence that already has output (never today: kept safe)
            matcher.accept_token(token)
        if matcher.is_terminated():
            self._ended.add(seq.key)
        self._matchers[seq.key] = matcher
        self._handles[seq.key] = matcher._handle if _xgrammar_core() is not None else matcher
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
        if self._prepared is not None:
            self._prepared.removed.add(key)
        self._compiling.pop(key, None)
        self._matchers.pop(key, None)
        self._handles.pop(key, None)
        self._ended.discard(key)

    # ------------------------------------------------------------------------------------------------ step
    def prepare(self, accepted_seqs: list[Sequence], accepted_tokens: list[int], seqs: list[Sequence]) -> None:
        """Start, on the grammar thread: advance the matchers of ``accepted_seqs`` with ``accepted_tokens`` (the
        previous step's), then fill the masks of the constrained rows among ``seqs`` (this step's sampling
        sequences). ``bitmask(seqs, ...)`` collects them (``seqs`` there: this list, or any with the same keys in
        the same order). The caller must not touch these matchers meanwhile.

        All the per-row Python (which matchers, which slots) runs here, on the engine thread, so the grammar thread
        makes two C++ calls that release the GIL (one batched accept, one fill on xgrammar's own threads) and
        needs the GIL only around them; the switch interval is lowered while the job is in flight so those
        hand-offs take a fraction of a millisecond instead of waiting out CPython's 5 ms for an engine thread
        that is busy in pure Python (the bookkeeping this job is meant to overlap)."""
        self._finish_prepared()
        if not (self.batched and self.overlap):
            self.accept(accepted_seqs, accepted_tokens)  # masks: filled when ``bitmask`` asks
            return
        # Accepted first (sequences not sampling this step too: finished, or not scheduled), so that a stop token
        # accepted now marks its row ended before the rows to fill are picked.
        accept_keys, accept_handles, accept_tokens = self._to_accept(accepted_seqs, accepted_tokens)
        ended = self._ended
        if seqs is accepted_seqs and len(accept_keys) == len(seqs) and (not ended or ended.isdisjoint(accept_keys)):
            # The rows that just accepted (the look before scheduling), every one constrained and still live: the
            # accept's lists are the fill's.
            keys, fill_handles = accept_keys, accept_handles
            rows, fill_slots, ended_slots = list(range(len(keys))), None, []
        else:
            keys = list(map(_key_of, seqs))
            rows, fill_handles, fill_slots, ended_slots = self._rows_to_fill(keys)
        if not rows and not accept_handles:
            return
        host = self._next_host_buffer(len(rows))
        self._saved_switch_interval = sys.getswitchinterval()  # restored by ``_finish_prepared``
        sys.setswitchinterval(GRAMMAR_SWITCH_INTERVAL_S)  # before the job exists: its first hand-off needs it too
        try:
            job = self._grammar_pool().submit(self._accept_and_fill, accept_keys, accept_handles, accept_tokens,
                                              fill_handles, fill_slots, ended_slots, host)
        except BaseException:
            sys.setswitchinterval(self._saved_switch_interval)
            raise
        self._prepared = _PreparedMasks(seqs, keys, rows, host, [job])

    def _to_accept(self, seqs: list[Sequence], tokens: list[int]) -> tuple[list[Key], list[Any], list[int]]:
        """The keys and live matchers (their ``_handles``) among ``seqs``, with their tokens; those whose token is a
        stop token are marked ended (accepting it terminates them; ``_accepted`` corrects a rejected one).

        A step whose every row is constrained and live (the steady state of a constrained batch) takes no per-row
        Python: the keys and handles are gathered with ``map`` and the ended / stop-token checks are set
        operations."""
        keys = list(map(_key_of, seqs))
        handles = list(map(self._handles.get, keys))
        ended, stop = self._ended, self._stop_token_ids
        if not _has_none(handles) and (not ended or ended.isdisjoint(keys)):
            if not stop.isdisjoint(tokens):
                ended.update(key for key, token in zip(keys, tokens) if token in stop)
            return keys, handles, list(tokens)
        accept_keys, accept_handles, accept_tokens = [], [], []
        for key, handle, token in zip(keys, handles, tokens):
            if handle is not None and key not in ended:
                accept_keys.append(key)
                accept_handles.append(handle)
                accept_tokens.append(token)
                if token in stop:
                    ended.add(key)
        return accept_keys, accept_handles, accept_tokens

    def _accepted(self, keys: list[Key], handles: list[Any], tokens: list[int], ok: list[bool]) -> None:
        """Log rejected tokens (the mask and the sampler disagree: a bug); a rejected stop token did not end its
        sequence's grammar."""
        if all(ok):
            return
        _check_accepted(ok, tokens)
        for key, handle, token, good in zip(keys, handles, tokens, ok):
            if not good and token in self._stop_token_ids and not handle.is_terminated():
                self._ended.discard(key)

    def _rows_to_fill(self, keys: list[Key]) -> tuple[list[int], list[Any], list[int] | None, list[int]]:
        """For a step's rows (their ``keys``): (its constrained rows, the live matchers' handles to fill and their
        slots in the step's mask (None: slots 0..n-1), the slots of ended rows). Every row constrained and live:
        no per-row Python (see ``_to_accept``)."""
        handles = list(map(self._handles.get, keys))
        ended = self._ended
        if not _has_none(handles) and (not ended or ended.isdisjoint(keys)):
            return list(range(len(keys))), handles, None, []
        rows, fill_handles, fill_slots, ended_slots = [], [], [], []
        for i, (key, handle) in enumerate(zip(keys, handles)):
            if handle is not None:
                if key in ended:
                    ended_slots.append(len(rows))
                else:
                    fill_slots.append(len(rows))
                    fill_handles.append(handle)
                rows.append(i)
        # Slots 0..n-1 (no ended row) go as None: xgrammar converts an index list element by element, holding the
        # GIL on the grammar thread.
        if fill_slots and fill_slots[-1] == len(fill_slots) - 1:
            fill_slots = None
        return rows, fill_handles, fill_slots, ended_slots

    def _accept_and_fill(self, accept_keys: list[Key], accept_handles: list[Any], accept_tokens: list[int],
                         fill_handles: list[Any], fill_slots: list[int] | None, ended_slots: list[int],
                         host: torch.Tensor) -> None:
        """Accept the tokens (one batched call), then fill ``host[fill_slots[i]]`` (``host[i]`` when None) for
        ``fill_handles[i]`` (one call on xgrammar's threads). Ended rows (past the grammar's end) allow anything.
        Both calls release the GIL; what runs here around them holds it, so it is kept to a few operations (no
        per-row Python: the engine thread built every list)."""
        if accept_handles:
            ok = _batch_accept_handles(accept_handles, accept_tokens)
            if ok is not None:  # some token was rejected
                self._accepted(accept_keys, accept_handles, accept_tokens, ok)
        for slot in ended_slots:
            host[slot].fill_(-1)
        if fill_handles:
            filler = self._batch_filler(len(fill_handles))
            if _xgrammar_core() is not None:
                filler._handle.batch_fill_next_token_bitmask(fill_handles, host, fill_slots, False)
            else:
                filler.batch_fill_next_token_bitmask(fill_handles, host, fill_slots)

    def bitmask(
        self, seqs: list[Sequence], device: torch.device, batch_rows: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, bitmask) for the constrained rows among ``seqs`` (the step's sampling sequences), or None: the
        masks ``prepare`` started for these ``seqs``, or filled now. ``batch_rows[i]``: the sampling batch row of
        ``seqs[i]`` (default ``i``; a speculative step's verify batch has one row per verified position, and a
        constrained sequence has exactly one: it gets no drafts). One non-blocking upload from pinned memory."""
        prepared = self._finish_prepared()
        slots = None  # the host row of each of ``rows`` (None: row i's mask is in host row i)
        # A sequence that finished while the job ran keeps its row (its sample is dropped), unless its id came back
        # with a new matcher: then its mask is stale and the rows are taken one by one.
        if prepared is not None and (not prepared.removed or prepared.removed.isdisjoint(self._handles)) \
                and _same_sequences(prepared, seqs):
            rows, host = prepared.rows, prepared.host
        elif prepared is not None and prepared.rows:
            # Filled for other sequences (the previous step's, say), or an id reused meanwhile.
            rows, host, slots = self._reuse_prepared(prepared, seqs)
        else:
            rows, host = self._fill_now(seqs)
        if not rows:
            return None
        if batch_rows is None and rows[-1] == len(rows) - 1:  # rows 0..n-1 (every row constrained): no upload
            device_rows = self._row_ids(len(rows), device)
        else:
            out_rows = rows if batch_rows is None else [batch_rows[i] for i in rows]
            device_rows = to_device(out_rows, torch.int64, device)
        if slots is None:
            return device_rows, self._upload(host[: len(rows)], device)
        # The used host rows go up as they are (one copy); the device picks this step's rows out of them.
        num_slots = max(slots) + 1
        if slots == list(range(num_slots)):
            return device_rows, self._upload(host[:num_slots], device)
        mask = self._upload(host[:num_slots], device)
        return device_rows, mask.index_select(0, to_device(slots, torch.int64, device))

    def _reuse_prepared(self, prepared: _PreparedMasks, seqs: list[Sequence]
                        ) -> tuple[list[int], torch.Tensor, list[int]]:
        """(constrained rows among ``seqs``, host masks, the host row of each) from masks ``prepare`` filled for
        other sequences (the engine starts the job before it knows this step's rows): a row whose sequence was
        filled there reuses its mask; the others (new or resumed sequences, a reused id) are filled now, after the
        prepared ones in the same buffer. The per-row Python here (a dict lookup a row) runs only when the rows
        changed."""
        keys = list(map(_key_of, seqs))
        prepared_keys = prepared.keys
        slot_of = {prepared_keys[row]: slot for slot, row in enumerate(prepared.rows)}
        for key in prepared.removed:
            slot_of.pop(key, None)
        host, handles, ended = prepared.host, self._handles, self._ended
        next_slot = len(prepared.rows)
        rows, slots, fill_handles, fill_slots, ended_slots = [], [], [], [], []
        for i, key in enumerate(keys):
            handle = handles.get(key)
            if handle is None:
                continue
            slot = slot_of.get(key)
            if slot is None:
                slot = next_slot
                next_slot += 1
                if key in ended:
                    ended_slots.append(slot)
                else:
                    fill_handles.append(handle)
                    fill_slots.append(slot)
            rows.append(i)
            slots.append(slot)
        if next_slot > host.shape[0]:  # more rows than a buffer holds (never with max_num_seqs sequences a step)
            return (*self._fill_now(seqs), None)  # type: ignore[return-value]
        if fill_handles or ended_slots:  # (only the batched path prepares jobs)
            self._accept_and_fill([], [], [], fill_handles, fill_slots, ended_slots, host)
        return rows, host, slots

    def _row_ids(self, num_rows: int, device: torch.device) -> torch.Tensor:
        """``arange(num_rows)`` on ``device``, sliced from one made once."""
        if self._arange is None or self._arange_device != device or self._arange.numel() < num_rows:
            self._arange = torch.arange(max(num_rows, self._max_rows), dtype=torch.int64, device=device)
            self._arange_device = device  # as asked ("cuda" is not the tensor's "cuda:0")
        return self._arange[:num_rows]

    def _fill_now(self, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor | None]:
        rows, fill_handles, fill_slots, ended_slots = self._rows_to_fill(list(map(_key_of, seqs)))
        if not rows:
            return rows, None
        host = self._next_host_buffer(len(rows))
        if self.batched:
            self._accept_and_fill([], [], [], fill_handles, fill_slots, ended_slots, host)
        else:  # the reference: one call per sequence, asking each matcher whether it ended
            for slot, i in enumerate(rows):
                matcher = self._matchers[seqs[i].key]
                if matcher.is_terminated():
                    host[slot].fill_(-1)
                else:
                    matcher.fill_next_token_bitmask(host, slot)
        return rows, host

    def _finish_prepared(self) -> _PreparedMasks | None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            try:
                for job in prepared.jobs:
                    job.result()
            finally:
                sys.setswitchinterval(self._saved_switch_interval)
        return prepared

    def accept(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Advance the matchers of ``seqs`` (constrained or not: the others are skipped) with their sampled tokens,
        now, on this thread."""
        self._finish_prepared()
        keys, handles, accept_tokens = self._to_accept(seqs, tokens)
        if not handles:
            return
        if self.batched:
            self._accept_and_fill(keys, handles, accept_tokens, [], None, [], torch.empty(0))
        else:
            matchers = [self._matchers[key] for key in keys]
            self._accepted(keys, handles, accept_tokens,
                           [m.accept_token(t) for m, t in zip(matchers, accept_tokens)])

    def _grammar_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-step", initializer=precise_timed_waits)
        return self._pool

    def _batch_filler(self, num_rows: int) -> Any:
        """The xgrammar batch filler for ``num_rows`` rows: one call fills them all on ``fill_threads`` C++ threads
        (no GIL)."""
        threads = fill_threads(num_rows, self._num_threads, self.rows_per_fill_thread)
        filler = self._fillers.get(threads)
        if filler is None:
            import xgrammar as xgr

            filler = self._fillers[threads] = xgr.BatchGrammarMatcher(max_threads=threads)
        return filler

    def _next_host_buffer(self, num_rows: int) -> torch.Tensor:
        """The next pinned [max rows, words] int32 buffer, once its previous upload has finished."""
        if not self._host_buffers or self._host_buffers[0].shape[0] < num_rows:
            pin = torch.cuda.is_available()
            # Twice the most rows a step has: masks filled for the previous step's sequences leave room for this
            # step's new ones (``_reuse_prepared``).
            size = max(2 * self._max_rows, num_rows)
            with torch.inference_mode(False):  # grammar threads write them outside the engine's inference mode
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
            # The sampler reads it within this step, long before the buffer comes round again (two steps on); a
            # copy would cost more than the fill on a busy machine (an intra-op parallel copy waits for every core).
            return host
        out = host.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._upload_events[index] = event
        return out

    def shutdown(self) -> None:
        self._finish_prepared()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.compiler.shutdown()


def _same_sequences(prepared: _PreparedMasks, seqs: list[Any]) -> bool:
    """Whether ``seqs`` are the sequences ``prepared`` was filled for, in the same order: the same list, or (the engine
    starts the job from the scheduler's sequences, the runner asks with its own) the same keys."""
    return prepared.seqs is seqs or (len(prepared.seqs) == len(seqs) and list(map(_key_of, seqs)) == prepared.keys)


def _has_none(values: list[Any]) -> bool:
    """``None in values`` by identity (no ``__eq__`` call per element)."""
    return any(map(operator.is_, values, repeat(None)))


def batch_accept_token(matchers: list[Any], tokens: list[int]) -> list[bool] | None:
    """Advance each matcher with its token in one xgrammar call (C++, without the GIL); None when every token was
    accepted, else the per-token results.

    xgrammar's ``BatchGrammarMatcher.batch_accept_token`` converts its result to a list of bools element by element
    through its FFI array (about 0.5 us a row, ~120 us at 256 rows, holding the GIL that the engine thread needs);
    its core binding's result answers ``0 in result`` in C (~1 us), so that one is called when present."""
    if _xgrammar_core() is not None:
        return _batch_accept_handles([m._handle for m in matchers], tokens)
    return _batch_accept_handles(matchers, tokens)


def _batch_accept_handles(handles: list[Any], tokens: list[int]) -> list[bool] | None:
    """``batch_accept_token`` on the manager's ``_handles`` (core handles, or the matchers without the core
    binding)."""
    core = _xgrammar_core()
    if core is None:
        import xgrammar as xgr

        ok = xgr.BatchGrammarMatcher.batch_accept_token(handles, tokens)
        return None if all(ok) else ok
    result = core.BatchGrammarMatcher.batch_accept_token(handles, tokens, False)
    if 0 not in result:
        return None
    return [bool(ok) for ok in result]


_XGRAMMAR_CORE: list[Any] = []


def _xgrammar_core() -> Any:
    """xgrammar's core bindings when they have the batched accept and fill this module calls with matcher handles
    (checked once), else None (then the public wrappers are called with the matchers)."""
    if not _XGRAMMAR_CORE:
        from xgrammar import base

        core = getattr(base, "_core", None)
        batch = getattr(core, "BatchGrammarMatcher", None)
        usable = callable(getattr(batch, "batch_accept_token", None)) and \
            callable(getattr(batch, "batch_fill_next_token_bitmask", None))
        _XGRAMMAR_CORE.append(core if usable else None)
    return _XGRAMMAR_CORE[0]


def _check_accepted(ok: list[bool], tokens: list[int]) -> None:
    if not all(ok):
        bad = [token for token, good in zip(tokens, ok) if not good]
        logger.error("Grammar rejected sampled tokens %s: the bitmask and the sampler disagree.", bad[:8])
