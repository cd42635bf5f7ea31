"""``POST /v1/chat/completions``: the chat template renders the messages, then generation as for completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from frontend.chat_template import (
    DEFAULT_MAX_OUTPUT_CHARS,
    TemplateLimitError,
    render_chat_template,
    special_tokens_of,
)
from frontend.output_processor import Logprob
from frontend.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogprob,
    ChatLogprobContent,
    ChatMessage,
    ChatResponseMessage,
    DeltaMessage,
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
from frontend.stream_frames import ChatFrames
from frontend.tool_calling import ToolPlan, plan_tool_calls, template_message
from frontend.usage import request_metrics, stream_usage_flags, usage_info


async def render_chat(ctx: ServingContext, messages: list[ChatMessage], add_generation_prompt: bool,
                      continue_final_message: bool, chat_template: str | None,
                      chat_template_kwargs: dict[str, Any] | None, tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text for ``messages`` (and the request's ``tools``, for templates that render them), rendered in
    a worker thread inside the sandbox's limits (``frontend/chat_template.py``); template problems are the
    client's (400), not the server's."""
    tokenizer = ctx.require_tokenizer()
    if chat_template is not None and not ctx.trust_request_chat_template:
        raise OpenAIError("Request-level chat templates are refused: the server must be started with "
                          "--trust-request-chat-template to accept them.", param="chat_template")
    conversation = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            entry["name"] = m.name
        conversation.append(template_message(entry, m))
    source = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # named templates: the default one
        source = source.get("default")
    if not source:
        raise OpenAIError("The model's tokenizer has no chat template: pass --chat-template or use "
                          "/v1/completions.")
    max_chars = ctx.max_prompt_chars or DEFAULT_MAX_OUTPUT_CHARS
    try:
        extra = {**({"tools": tools} if tools else {}), **(chat_template_kwargs or {})}
        return await ctx.run_blocking(lambda: render_chat_template(
            source, conversation, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, special_tokens=special_tokens_of(tokenizer),
            extra=extra, time_limit_s=ctx.chat_template_time_limit_s, max_output_chars=max_chars))
    except OpenAIError:
        raise
    except TemplateLimitError as exc:
        raise OpenAIError(str(exc), param="chat_template" if chat_template is not None else "messages") from None
    except Exception as exc:
        raise OpenAIError(f"Could not apply the chat template: {exc}", param="messages") from None


def chat_logprobs(ctx: ServingContext, token_ids: list[int], rows: list[dict[int, Logprob]],
                  num_top: int, as_token_ids: bool = False,
                  requested_ids: list[int] | None = None) -> ChatChoiceLogprobs:
    """OpenAI's chat logprobs: each token with its logprob and bytes, and the ``num_top`` most likely tokens —
    or, with logprob_token_ids (``requested_ids``), those ids in the order asked, the sampled one among them or
    not. ``as_token_ids``: tokens spelled ``token_id:N`` (return_tokens_as_token_ids)."""
    content = []
    for token_id, row in zip(token_ids, rows):
        chosen = row.get(token_id)
        token = ctx.logprob_token(token_id, chosen, as_token_ids)
        if requested_ids:
            top = [(tid, row[tid]) for tid in requested_ids if tid in row]
        elif num_top:
            top = sorted(((tid, lp) for tid, lp in row.items() if lp.rank is not None and lp.rank <= num_top),
                         key=lambda item: item[1].rank)
        else:
            top = []
        content.append(ChatLogprobContent(
            token=token,
            logprob=clamp_logprob(chosen.logprob) if chosen is not None else -9999.0,
            bytes=list(token.encode("utf-8", errors="replace")),
            top_logprobs=[_chat_logprob(ctx, tid, lp, as_token_ids) for tid, lp in top],
        ))
    return ChatChoiceLogprobs(content=content)


def _chat_logprob(ctx: ServingContext, token_id: int, lp: Logprob, as_token_ids: bool) -> ChatLogprob:
    token = ctx.logprob_token(token_id, lp, as_token_ids)
    return ChatLogprob(token=token, logprob=clamp_logprob(lp.logprob),
                       bytes=list(token.encode("utf-8", errors="replace")))


class ChatServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        ctx = self.ctx
        ctx.check_model(request.model)
        request.check(ctx.max_logprobs, ctx.vocab_size)
        ctx.check_limits(request)
        ctx.check_engine()
        tools = plan_tool_calls(request, ctx.enable_auto_tool_choice, ctx.tool_call_parser)
        if request.prompt_token_ids is not None:
            if not request.prompt_token_ids:
                raise OpenAIError("prompt_token_ids must not be empty.", param="prompt_token_ids")
            ctx.check_token_ids(request.prompt_token_ids, param="prompt_token_ids")
            prompt_ids = list(request.prompt_token_ids)
            prompt = None
        else:
            prompt = await render_chat(ctx, request.messages, request.add_generation_prompt,
                                       request.continue_final_message, request.chat_template,
                                       request.chat_template_kwargs,
                                       tools.template_tools if tools is not None else None)
            ctx.check_text_length(prompt, "messages")
            prompt_ids = await ctx.encode(prompt, request.add_special_tokens)
        kept = truncate_prompt(prompt_ids, request.truncate_prompt_tokens, request.truncation_side,
                               ctx.max_model_len)
        if len(kept) != len(prompt_ids):
            prompt, prompt_ids = None, kept
        if not prompt_ids:
            raise OpenAIError(EMPTY_PROMPT, param="messages")
        params = request.to_sampling_params(len(prompt_ids), ctx.max_model_len, ctx.default_sampling,
                                            ctx.max_logprobs, ctx.vocab_size)
        if tools is not None:
            tools.apply(params)
        ctx.check_sampling_params(params, request.bad_words)
        request_id = request.request_id or random_id("chatcmpl")
        ctx.log_request(request_id, prompt, prompt_ids, params)
        role = "assistant" if request.add_generation_prompt else request.messages[-1].role
        echo_text = ""
        if request.echo and request.messages[-1].role == role:
            echo_text = request.messages[-1].text()
        created = int(time.time())
        if request.stream:
            return sse_response(self._stream(request, request_id, created, prompt, prompt_ids, params, role,
                                             echo_text, tools))
        try:
            return await run_until_disconnect(
                raw_request, self._full(request, request_id, created, prompt, prompt_ids, params, role, echo_text,
                                        tools))
        except Exception as exc:
            raise engine_error(exc) from exc

    async def _full(self, request: ChatCompletionRequest, request_id: str, created: int, prompt: str | None,
                    prompt_ids: list[int], params, role: str, echo_text: str,
                    tools: ToolPlan | None = None) -> Response:
        final = None
        async for out in self.ctx.client.generate(request_id, prompt, prompt_ids, params, stream_deltas=False,
                                                  final_only=True, cache_salt=request.cache_salt):
            final = out
        choices = []
        completion_tokens = 0
        for seq in final.outputs:
            logprobs = None
            if request.logprobs and seq.logprobs is not None:
                logprobs = chat_logprobs(self.ctx, seq.token_ids, seq.logprobs, params.logprobs or 0,
                                         request.return_tokens_as_token_ids, params.logprob_token_ids)
            message = ChatResponseMessage(role=role, content=echo_text + seq.text)
            finish_reason = seq.finish_reason
            if tools is not None:
                content, message.tool_calls = tools.extract(seq.text)
                message.content = content if content is None else echo_text + content
                if message.tool_calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
            choice = ChatCompletionChoice(
                index=seq.index, message=message,
                logprobs=logprobs, finish_reason=finish_reason, stop_reason=seq.stop_reason,
            )
            if request.return_token_ids:
                choice.token_ids = seq.token_ids
            choices.append(choice)
            completion_tokens += len(seq.token_ids)
        usage_options = self.ctx.usage
        response = ChatCompletionResponse(
            id=request_id, created=created, model=self.ctx.model_name, choices=choices,
            usage=usage_info(usage_options, len(prompt_ids), completion_tokens, final.num_cached_tokens),
            prompt_logprobs=self.ctx.prompt_logprobs_json(final.prompt_logprobs)
            if request.prompt_logprobs is not None else None,
        )
        if request.return_token_ids:
            response.prompt_token_ids = prompt_ids
        if usage_options.per_request_metrics:
            response.metrics = request_metrics([final])
        return json_response(response)

    async def _stream(self, request: ChatCompletionRequest, request_id: str, created: int, prompt: str | None,
                      prompt_ids: list[int], params, role: str, echo_text: str,
                      tools: ToolPlan | None = None) -> AsyncIterator[str | bytes]:
        model = self.ctx.model_name
        num_prompt_tokens = len(prompt_ids)
        completion_tokens = 0
        usage_options = self.ctx.usage
        include_usage, continuous_usage = stream_usage_flags(request.stream_options,
                                                             usage_options.force_include_usage)
        latest = None  # the latest output (cached tokens, timing)

        def chunk(choice: ChatCompletionStreamChoice, first: bool = False) -> str:
            c = ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=[choice])
            if continuous_usage:
                c.usage = usage_info(usage_options, num_prompt_tokens, completion_tokens,
                                     latest.num_cached_tokens if latest is not None else 0)
            if first and request.return_token_ids:
                c.prompt_token_ids = prompt_ids
            return c.to_json()

        streamers = [tools.streamer() for _ in range(params.n)] if tools is not None else None
        frames = ChatFrames(request_id, created, model)
        plain_text = not (request.logprobs or request.return_token_ids or continuous_usage)
        try:
            # The first chunk of each choice carries the role (and the echoed message, if asked).
            for index in range(params.n):
                yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role=role, content="")),
                            first=True)
                if echo_text:
                    yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(content=echo_text)))
            async for _, out in merge_async_iterators(
                    self.ctx.client.generate(request_id, prompt, prompt_ids, params, stream_deltas=True,
                                             cache_salt=request.cache_salt)):
                latest = out
                for seq in out.outputs:
                    completion_tokens += len(seq.token_ids)
                    if streamers is not None:
                        streamer = streamers[seq.index]
                        content, tool_deltas = streamer.feed(seq.text, seq.finish_reason is not None)
                        finish_reason = seq.finish_reason
                        if finish_reason == "stop" and streamer.calls:
                            finish_reason = "tool_calls"
                        if not content and not tool_deltas and finish_reason is None:
                            continue
                        choice = ChatCompletionStreamChoice(
                            index=seq.index, delta=DeltaMessage(content=content or ("" if not tool_deltas else None),
                                                                tool_calls=tool_deltas or None),
                            finish_reason=finish_reason, stop_reason=seq.stop_reason)
                        if request.return_token_ids:
                            choice.token_ids = seq.token_ids
                        yield chunk(choice)
                        continue
                    wants_ids = (request.logprobs or request.return_token_ids) and seq.token_ids
                    if not seq.text and seq.finish_reason is None and not wants_ids:
                        continue
                    if plain_text and seq.finish_reason is None:
                        yield frames.text(seq.index, seq.text)  # the per-token path: one pre-encoded frame
                        continue
                    logprobs = None
                    if request.logprobs and seq.logprobs is not None:
                        logprobs = chat_logprobs(self.ctx, seq.token_ids, seq.logprobs, params.logprobs or 0,
                                                 request.return_tokens_as_token_ids, params.logprob_token_ids)
                    choice = ChatCompletionStreamChoice(
                        index=seq.index, delta=DeltaMessage(content=seq.text), logprobs=logprobs,
                        finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                    )
                    if request.return_token_ids:
                        choice.token_ids = seq.token_ids
                    yield chunk(choice)
            if include_usage:
                final = ChatCompletionStreamResponse(
                    id=request_id, created=created, model=model, choices=[],
                    usage=usage_info(usage_options, num_prompt_tokens, completion_tokens,
                                     latest.num_cached_tokens if latest is not None else 0),
                )
                if usage_options.per_request_metrics and latest is not None:
                    final.metrics = request_metrics([latest])
                yield final.to_json()
        except Exception as exc:
            yield error_event(exc)
