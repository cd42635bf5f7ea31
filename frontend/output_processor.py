"""Turns the core's per-step token ids into vLLM-shaped ``RequestOutput``s: text, logprobs, stop strings.

Shared by the API server (one per server) and the offline ``LLM`` (in-process), it holds the frontend's only
per-request table: ``RequestState`` (text state, output queue, latency stats), and ``EmbeddingState`` for the
server's embedding requests (output queue and latency stats only: no text, no tokens, one output). The core knows
nothing of text: stop strings are found here, and the sequences they end are handed back in ``to_abort`` so the
caller aborts them in the core.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from frontend.batch_detokenize import BatchDecoder
from frontend.detokenizer import SequenceText
from ipc.messages import EngineOutput, FinishReason, Logprobs, SamplingParams

if TYPE_CHECKING:
    from frontend.metrics import Metrics


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # Latency (time.monotonic()), for --enable-per-request-metrics.
    arrival_time: float = 0.0
    first_token_time: float | None = None
    last_token_time: float = 0.0
    num_generation_tokens: int = 0


@dataclass(slots=True)
class ProcessedOutputs:
    request_outputs: list[RequestOutput] = field(default_factory=list)
    to_abort: list[tuple[str, int]] = field(default_factory=list)  # (request_id, sequence index)


class TokenStrings:
    """``decode([id])`` per token id, cached: the ``decoded_token`` of logprobs (vLLM spells tokens this way)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        self._decode = backend.decode if backend is not None and hasattr(backend, "get_vocab_size") else None
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str | None:
        if self._tokenizer is None:
            return None
        text = self._cache.get(token_id)
        if text is None:
            if self._decode is not None:
                text = self._decode([token_id], skip_special_tokens=False)
            else:
                text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def logprob_rows(rows: Logprobs, token_strings: TokenStrings) -> tuple[SampleLogprobs, float]:
    """One dict per position: the chosen token (with its vocabulary rank) and the top-N (ranks 1..N)."""
    result: SampleLogprobs = []
    total = 0.0
    for ids, lps, rank in zip(rows.token_ids, rows.logprobs, rows.ranks):
        entry: dict[int, Logprob] = {ids[0]: Logprob(lps[0], rank, token_strings(ids[0]))}
        for top_rank, (tid, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
            if tid not in entry:
                entry[tid] = Logprob(lp, top_rank, token_strings(tid))
        result.append(entry)
        total += lps[0]
    return result, total


class _Sequence:
    __slots__ = (
        "index", "token_ids", "text", "logprobs", "cumulative_logprob", "finish_reason", "stop_reason",
        "sent_tokens", "sent_text", "sent_logprobs", "changed",
    )

    def __init__(self, index: int, text: SequenceText | None, want_logprobs: bool) -> None:
        self.index = index
        self.token_ids: list[int] = []
        self.text = text
        self.logprobs: SampleLogprobs | None = [] if want_logprobs else None
        self.cumulative_logprob: float | None = 0.0 if want_logprobs else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.sent_tokens = 0
        self.sent_text = 0
        self.sent_logprobs = 0
        self.changed = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, stop_reason: int | str | None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        if self.text is not None:
            self.text.finish()


class RequestState:
    """Everything the frontend tracks about one request, in one place: its text state (one ``_Sequence`` per
    index, prompt logprobs), where its outputs go and its latency stats.

    ``queue``: the server's ``generate()`` waits on it, and outputs (or the exception that ends the request) are
    put on it directly; None for the offline ``LLM``, which reads ``ProcessedOutputs.request_outputs``.
    """

    __slots__ = (
        "request_id", "prompt", "prompt_token_ids", "params", "stream_deltas", "final_only", "seqs",
        "prompt_logprobs", "prompt_logprobs_sent", "num_cached_tokens", "num_finished",
        "queue", "arrival", "first_token_time", "last_token_time", "num_generation_tokens", "step_tokens",
        "queue_time_s",
    )

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer: Any, stream_deltas: bool, final_only: bool, queue: asyncio.Queue | None = None,
                 arrival: float = 0.0) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.stream_deltas = stream_deltas
        self.final_only = final_only
        want_logprobs = params.logprobs is not None
        self.seqs = [
            _Sequence(
                i,
                SequenceText(
                    tokenizer, prompt_token_ids, params.stop_strings, params.include_stop_str_in_output,
                    params.skip_special_tokens, params.spaces_between_special_tokens, params.min_tokens,
                    deferred=final_only,
                ) if tokenizer is not None else None,
                want_logprobs,
            )
            for i in range(params.n)
        ]
        self.prompt_logprobs: PromptLogprobs | None = None
        self.prompt_logprobs_sent = False
        self.num_cached_tokens = 0
        self.num_finished = 0
        self.queue = queue
        self.arrival = arrival  # time.monotonic() when the request arrived (latency metrics)
        self.first_token_time: float | None = None
        self.last_token_time = 0.0
        self.num_generation_tokens = 0
        self.step_tokens = 0  # tokens received in the step being processed
        self.queue_time_s = 0.0  # the core's arrival-to-first-scheduling time

    def record_step(self, metrics: Metrics, now: float) -> None:
        """Time to first token, or the inter-token latency, of the tokens this step brought."""
        if self.first_token_time is None:
            self.first_token_time = now
            metrics.record_first_token(now - self.arrival, len(self.prompt_token_ids))
            metrics.record_tokens(self.step_tokens, None)
        else:
            metrics.record_tokens(self.step_tokens, now - self.last_token_time)
        self.last_token_time = now
        self.num_generation_tokens += self.step_tokens

    def record_finished(self, metrics: Metrics, reason: str, now: float) -> None:
        metrics.record_finished(reason, now - self.arrival, len(self.prompt_token_ids), self.num_generation_tokens)
        first = self.first_token_time
        scheduled = min(self.arrival + self.queue_time_s, first if first is not None else now)
        metrics.record_request_phases(
            queue_s=self.queue_time_s,
            prefill_s=(first - scheduled) if first is not None else None,
            decode_s=(self.last_token_time - first) if first is not None else None,
            inference_s=((self.last_token_time if first is not None else now) - scheduled),
            n=self.params.n, max_tokens=self.params.max_tokens,
            max_generation_tokens=max(len(seq.token_ids) for seq in self.seqs),
        )


class EmbeddingState:
    """An embedding request in the same table: it ends with one output carrying the embedding (float32 bytes), put
    on ``queue`` as it is; an exception put there ends it instead (same contract as ``RequestState.queue``)."""

    __slots__ = ("request_id", "num_prompt_tokens", "queue", "arrival")

    def __init__(self, request_id: str, num_prompt_tokens: int, queue: asyncio.Queue, arrival: float) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.queue = queue
        self.arrival = arrival

    def finish(self, out: EngineOutput, metrics: Metrics | None, now: float) -> None:
        if out.embedding is not None:
            self.queue.put_nowait(out.embedding)
        else:  # the core ended it otherwise (the frontend's own aborts have left the table already)
            self.queue.put_nowait(RuntimeError(f"The engine ended embedding request {self.request_id} without an "
                                               f"embedding ({out.finish_reason})."))
        if metrics is not None:
            self.record_finished(metrics, str(out.finish_reason), now)

    def record_finished(self, metrics: Metrics, reason: str, now: float) -> None:
        metrics.record_finished(reason, now - self.arrival, self.num_prompt_tokens, 0)


class OutputProcessor:
    """The frontend's one table of in-flight requests (``RequestState``, and ``EmbeddingState`` for embedding
    requests). ``process_outputs`` is called with each ``EngineOutputs.outputs``.

    Modes per request: cumulative (default; every output so far), ``stream_deltas`` (only what is new since the
    previous ``RequestOutput``, for streaming), ``final_only`` (one ``RequestOutput`` when the request finishes,
    for offline generation).
    """

    def __init__(self, tokenizer: Any | None, batched_detokenize: bool = False) -> None:
        self.tokenizer = tokenizer
        self._token_strings = TokenStrings(tokenizer)
        self._requests: dict[str, RequestState | EmbeddingState] = {}
        # The server decodes every sequence that advanced in one tokenizer call per step (frontend/batch_detokenize.py).
        self._batch_decoder = BatchDecoder.for_tokenizer(tokenizer) if batched_detokenize else None

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    stream_deltas: bool = False, final_only: bool = False, queue: asyncio.Queue | None = None,
                    arrival: float = 0.0) -> RequestState:
        self._check_new_id(request_id)
        state = RequestState(request_id, prompt, prompt_token_ids, params, self.tokenizer, stream_deltas, final_only,
                             queue, arrival)
        self._requests[request_id] = state
        return state

    def add_embedding_request(self, request_id: str, num_prompt_tokens: int, queue: asyncio.Queue,
                              arrival: float = 0.0) -> EmbeddingState:
        self._check_new_id(request_id)
        state = EmbeddingState(request_id, num_prompt_tokens, queue, arrival)
        self._requests[request_id] = state
        return state

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self._requests:
            raise ValueError(f"Request id {request_id!r} is already in use.")

    def abort_request(self, request_id: str) -> RequestState | EmbeddingState | None:
        """Forget a request (its later outputs from the core, e.g. the ABORT ones, are ignored); returns its state
        if it was still in flight."""
        return self._requests.pop(request_id, None)

    def abort_all(self) -> list[RequestState | EmbeddingState]:
        """Forget every request (the engine is gone); returns their states."""
        states = list(self._requests.values())
        self._requests.clear()
        return states

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def process_outputs(self, outputs: list[EngineOutput], metrics: Metrics | None = None,
                        now: float = 0.0) -> ProcessedOutputs:
        """Apply one step's outputs. A request's ``RequestOutput`` goes to its queue, or (no queue) into the
        result; with ``metrics``, the step's token latencies and finished requests are recorded at ``now``."""
        result = ProcessedOutputs()
        if self._batch_decoder is not None:
            self._batch_decoder.predecode(outputs, self._requests)
        changed: dict[str, RequestState] = {}
        reached: dict[str, RequestState] = {}  # requests that got outputs this step (latency metrics)
        for out in outputs:
            req = self._requests.get(out.request_id)
            if req is None:
                continue  # finished or aborted here already; the core is catching up
            if isinstance(req, EmbeddingState):
                if out.finished:
                    del self._requests[out.request_id]
                    req.finish(out, metrics, now)
                continue
            if metrics is not None:
                if out.request_id not in reached:
                    reached[out.request_id] = req
                    req.step_tokens = 0
                req.step_tokens += len(out.new_token_ids)
            if out.index >= len(req.seqs):
                continue
            seq = req.seqs[out.index]
            if seq.finished:
                continue
            self._add_prompt_logprobs(req, out)
            if out.num_cached_tokens > req.num_cached_tokens:
                req.num_cached_tokens = out.num_cached_tokens
            if out.queue_time_s > req.queue_time_s:
                req.queue_time_s = out.queue_time_s
            self._add_tokens(req, seq, out, result)
            changed[req.request_id] = req
        for req in reached.values():
            req.record_step(metrics, now)
        for req in changed.values():
            finished = req.num_finished == len(req.seqs)
            if finished:
                del self._requests[req.request_id]
            if not req.final_only or finished:
                output = self._make_output(req, finished)
                if req.queue is not None:
                    req.queue.put_nowait(output)
                else:
                    result.request_outputs.append(output)
                if finished and metrics is not None:
                    reason = output.outputs[0].finish_reason if output.outputs else "stop"
                    req.record_finished(metrics, reason or "stop", now)
            for seq in req.seqs:
                seq.changed = False
        return result

    # ------------------------------------------------------------------------------------------------------

    def _add_prompt_logprobs(self, req: RequestState, out: EngineOutput) -> None:
        if out.prompt_logprobs is None:
            return
        rows, _ = logprob_rows(out.prompt_logprobs, self._token_strings)
        if req.prompt_logprobs is None:
            # The first prompt token has no logprob: pad the front so position i is prompt token i.
            pad = max(0, len(req.prompt_token_ids) - len(rows))
            req.prompt_logprobs = [None] * pad
            if pad == 0:
                rows[0] = None  # a row for the first token carries nothing meaningful
        req.prompt_logprobs.extend(rows)

    def _add_tokens(self, req: RequestState, seq: _Sequence, out: EngineOutput, result: ProcessedOutputs) -> None:
        seq.changed = True
        seq.token_ids.extend(out.new_token_ids)
        if seq.logprobs is not None and out.new_logprobs is not None:
            rows, total = logprob_rows(out.new_logprobs, self._token_strings)
            seq.logprobs.extend(rows)
            seq.cumulative_logprob += total
        stop_string = None
        if seq.text is not None:
            stop_string = seq.text.add_tokens(out.new_token_ids, out.finish_reason == FinishReason.STOP)
        if stop_string is not None:
            seq.finish("stop", stop_string)
            if not out.finished:
                result.to_abort.append((req.request_id, seq.index))
        elif out.finish_reason is not None:
            seq.finish(str(out.finish_reason), out.stop_reason)
        if seq.finished:
            req.num_finished += 1

    def _make_output(self, req: RequestState, finished: bool) -> RequestOutput:
        if req.stream_deltas:
            completions = [self._delta(seq) for seq in req.seqs if seq.changed]
            prompt_logprobs = None
            if not req.prompt_logprobs_sent and req.prompt_logprobs is not None:
                prompt_logprobs = req.prompt_logprobs
                req.prompt_logprobs_sent = True
        else:
            completions = [self._cumulative(seq) for seq in req.seqs]
            prompt_logprobs = req.prompt_logprobs
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=completions,
            finished=finished,
            num_cached_tokens=req.num_cached_tokens,
            arrival_time=req.arrival,
            first_token_time=req.first_token_time,
            last_token_time=req.last_token_time,
            num_generation_tokens=req.num_generation_tokens,
        )

    @staticmethod
    def _cumulative(seq: _Sequence) -> CompletionOutput:
        text = ""
        if seq.text is not None:
            text = seq.text.text
            if not seq.finished:
                text = text[: seq.text.visible_len(False)]
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=seq.token_ids,
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=seq.logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )

    @staticmethod
    def _delta(seq: _Sequence) -> CompletionOutput:
        text = ""
        if seq.text is not None:
            end = seq.text.visible_len(seq.finished)
            text = seq.text.text[seq.sent_text : end]
            seq.sent_text = max(seq.sent_text, end)
        token_ids = seq.token_ids[seq.sent_tokens :]
        seq.sent_tokens = len(seq.token_ids)
        logprobs = None
        if seq.logprobs is not None:
            logprobs = seq.logprobs[seq.sent_logprobs :]
            seq.sent_logprobs = len(seq.logprobs)
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
