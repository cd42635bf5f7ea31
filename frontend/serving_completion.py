"""``POST /v1/completions``: text or token-id prompts (one or a batch), streaming or not, echo and logprobs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from frontend.output_processor import Logprob, RequestOutput
from frontend.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    EMPTY_PROMPT,
    OpenAIError,
    random_id,
    truncate_prompt,
)
from frontend.serving_common import (
    ServingContext,
    clamp_logprob,
    engine_error,
    error_event,
    json_response,
    merge_async_iterators,
    run_until_disconnect,
    sse_response,
)
from core.tokenizer import encode
from frontend.stream_frames import CompletionFrames
from frontend.usage import request_metrics, stream_usage_flags, usage_info
from ipc.messages import SamplingParams


def completion_logprobs(ctx: ServingContext, token_ids: list[int], rows: list[dict[int, Logprob] | None],
                        num_top: int, text_offset: int, as_token_ids: bool = False) -> CompletionLogprobs:
    """The legacy completions logprobs shape: tokens, token_logprobs, top_logprobs, text_offset.

    A ``None`` row (the first prompt token, when echoing) has no logprob, as in OpenAI's API. ``top_logprobs``
    holds the ``num_top`` most likely tokens, plus the sampled one when it is not among them (vLLM's count).
    ``as_token_ids``: tokens spelled ``token_id:N`` (return_tokens_as_token_ids).
    """
    out = CompletionLogprobs()
    for token_id, row in zip(token_ids, rows):
        if row is None:
            token = ctx.logprob_token(token_id, None, as_token_ids)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            chosen = row.get(token_id)
            token = ctx.logprob_token(token_id, chosen, as_token_ids)
            out.token_logprobs.append(clamp_logprob(chosen.logprob) if chosen is not None else None)
            top: dict[str, float] = {}
            for tid, lp in row.items():
                if tid == token_id or (lp.rank is not None and lp.rank <= num_top):
                    top[ctx.logprob_token(tid, lp, as_token_ids)] = clamp_logprob(lp.logprob)
            out.top_logprobs.append(top)
        out.tokens.append(token)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


def num_top_logprobs(params: SamplingParams) -> int:
    """How many ranked entries a position's top_logprobs holds: the top-N asked (-1 already resolved to the
    vocabulary), or every id of logprob_token_ids (ranked 1..M in the order asked)."""
    return max(params.logprobs or 0, len(params.logprob_token_ids or ()))


class CompletionServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, request: CompletionRequest, raw_request: Request) -> Response:
        ctx = self.ctx
        ctx.check_model(request.model)
        ctx.check_limits(request)
        ctx.check_engine()
        prompts = await self._tokenize_all(request)
        params = [request.to_sampling_params(len(ids), ctx.max_model_len, ctx.default_sampling, ctx.max_logprobs,
                                             ctx.vocab_size)
                  for _, ids in prompts]
        for p in params:
            ctx.check_sampling_params(p, request.bad_words)
        base_id = request.request_id or random_id("cmpl")
        created = int(time.time())
        if request.stream:
            return sse_response(self._stream(request, base_id, created, prompts, params))
        try:
            return await run_until_disconnect(raw_request, self._full(request, base_id, created, prompts, params))
        except Exception as exc:
            raise engine_error(exc) from exc

    async def _tokenize_all(self, request: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """Each prompt's (text or None, token ids), truncated as asked. A batch is tokenized in one worker-thread
        call, off the event loop; a truncated prompt loses its text (echo then decodes the kept ids)."""
        items = request.prompts()
        if len(items) == 1 and isinstance(items[0], str):
            encoded = [(items[0], await self.ctx.encode(items[0], request.add_special_tokens))]
        else:
            encoded = await self.ctx.run_blocking(self._tokenize_batch, items, request.add_special_tokens)
        return [self._truncated(text, ids, request) for text, ids in encoded]

    def _tokenize_batch(self, items: list[str | list[int]], add_special_tokens: bool) -> list[tuple[str | None, list[int]]]:
        out: list[tuple[str | None, list[int]]] = []
        for prompt in items:
            if isinstance(prompt, str):
                out.append((prompt, encode(self.ctx.require_tokenizer(), prompt, add_special_tokens)))
            else:
                self.ctx.check_token_ids(prompt)
                out.append((None, prompt))
        return out

    def _truncated(self, text: str | None, ids: list[int], request: CompletionRequest) -> tuple[str | None, list[int]]:
        kept = truncate_prompt(ids, request.truncate_prompt_tokens, request.truncation_side, self.ctx.max_model_len)
        if len(kept) != len(ids):
            text, ids = None, kept
        if not ids:
            raise OpenAIError(EMPTY_PROMPT, param="prompt")
        return text, ids

    def _echo_text(self, prompt: str | None, ids: list[int]) -> str:
        if prompt is not None:
            return prompt
        return self.ctx.decode(ids)

    def _generators(self, request: CompletionRequest, base_id: str, prompts, params: list[SamplingParams]):
        for i, ((prompt, ids), p) in enumerate(zip(prompts, params)):
            self.ctx.log_request(f"{base_id}-{i}", prompt, ids, p)
        return [
            self.ctx.client.generate(f"{base_id}-{i}", prompt, ids, p, stream_deltas=request.stream,
                                     final_only=not request.stream, cache_salt=request.cache_salt)
            for i, ((prompt, ids), p) in enumerate(zip(prompts, params))
        ]

    async def _full(self, request: CompletionRequest, base_id: str, created: int, prompts,
                    params: list[SamplingParams]) -> Response:
        finals: list[RequestOutput | None] = [None] * len(prompts)
        async for i, out in merge_async_iterators(*self._generators(request, base_id, prompts, params)):
            finals[i] = out
        choices = []
        completion_tokens = 0
        for i, out in enumerate(finals):
            prompt, ids = prompts[i]
            for seq in out.outputs:
                text = seq.text
                token_ids, rows = seq.token_ids, seq.logprobs
                if request.echo:
                    text = self._echo_text(prompt, ids) + text
                    if rows is not None:
                        token_ids = ids + token_ids
                        rows = list(out.prompt_logprobs or [None] * len(ids)) + rows
                logprobs = None
                if request.logprobs is not None and rows is not None:
                    logprobs = completion_logprobs(self.ctx, token_ids, rows, num_top_logprobs(params[i]), 0,
                                                   request.return_tokens_as_token_ids)
                choice = CompletionChoice(
                    index=i * request.n + seq.index, text=text, logprobs=logprobs, finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason, prompt_logprobs=self.ctx.prompt_logprobs_json(out.prompt_logprobs)
                    if request.prompt_logprobs is not None else None,
                )
                if request.return_token_ids:
                    choice.prompt_token_ids, choice.token_ids = ids, seq.token_ids
                choices.append(choice)
                completion_tokens += len(seq.token_ids)
        choices.sort(key=lambda c: c.index)
        num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        usage_options = self.ctx.usage
        response = CompletionResponse(
            id=base_id, created=created, model=self.ctx.model_name, choices=choices,
            usage=usage_info(usage_options, num_prompt_tokens, completion_tokens,
                             sum(out.num_cached_tokens for out in finals)),
        )
        if usage_options.per_request_metrics:
            response.metrics = request_metrics(finals)
        return json_response(response)

    async def _stream(self, request: CompletionRequest, base_id: str, created: int, prompts,
                      params: list[SamplingParams]) -> AsyncIterator[str | bytes]:
        n = request.n
        num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        completion_tokens = 0
        usage_options = self.ctx.usage
        include_usage, continuous_usage = stream_usage_flags(request.stream_options,
                                                             usage_options.force_include_usage)
        latest: dict[int, RequestOutput] = {}  # per prompt: its latest output (cached tokens, timing)
        first_chunk_sent: set[int] = set()
        echoed: set[int] = set()
        text_offsets: dict[int, int] = {}
        prompt_rows: dict[int, list] = {}
        frames = CompletionFrames(base_id, created, self.ctx.model_name)
        plain_text = not (request.return_token_ids or continuous_usage)
        try:
            async for i, out in merge_async_iterators(*self._generators(request, base_id, prompts, params)):
                latest[i] = out
                if out.prompt_logprobs is not None:
                    prompt_rows[i] = out.prompt_logprobs
                for seq in out.outputs:
                    index = i * n + seq.index
                    text, token_ids, rows = seq.text, seq.token_ids, seq.logprobs
                    new_token_ids = token_ids
                    completion_tokens += len(token_ids)
                    if request.echo and index not in echoed:
                        echoed.add(index)
                        prompt, ids = prompts[i]
                        text = self._echo_text(prompt, ids) + text
                        if rows is not None:
                            token_ids = ids + token_ids
                            rows = list(prompt_rows.get(i) or [None] * len(ids)) + rows
                    if not text and not token_ids and seq.finish_reason is None:
                        continue
                    logprobs = None
                    if request.logprobs is not None and rows is not None:
                        logprobs = completion_logprobs(self.ctx, token_ids, rows, num_top_logprobs(params[i]),
                                                       text_offsets.get(index, 0), request.return_tokens_as_token_ids)
                    text_offsets[index] = text_offsets.get(index, 0) + len(text)
                    if plain_text and logprobs is None and seq.finish_reason is None:
                        first_chunk_sent.add(index)
                        yield frames.text(index, text)  # the per-token path: one pre-encoded frame
                        continue
                    choice = CompletionStreamChoice(index=index, text=text, logprobs=logprobs,
                                                    finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
                    if request.return_token_ids:
                        choice.token_ids = new_token_ids
                        if index not in first_chunk_sent:
                            choice.prompt_token_ids = prompts[i][1]
                    first_chunk_sent.add(index)
                    chunk = CompletionStreamResponse(id=base_id, created=created, model=self.ctx.model_name,
                                                     choices=[choice])
                    if continuous_usage:
                        chunk.usage = usage_info(usage_options, num_prompt_tokens, completion_tokens,
                                                 sum(o.num_cached_tokens for o in latest.values()))
                    yield chunk.to_json()
            if include_usage:
                final = CompletionStreamResponse(
                    id=base_id, created=created, model=self.ctx.model_name, choices=[],
                    usage=usage_info(usage_options, num_prompt_tokens, completion_tokens,
                                     sum(o.num_cached_tokens for o in latest.values())),
                )
                if usage_options.per_request_metrics and latest:
                    final.metrics = request_metrics(list(latest.values()))
                yield final.to_json()
        except Exception as exc:
            yield error_event(exc)
