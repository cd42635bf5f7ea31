"""``POST /v1/chat/completions``: the chat template renders the messages, then generation as for completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

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
    OpenAIError,
    UsageInfo,
    random_id,
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
from frontend.tool_calling import ToolPlan, plan_tool_calls, template_message


def render_chat(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool,
                continue_final_message: bool, chat_template: str | None,
                chat_template_kwargs: dict[str, Any] | None, tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text for ``messages``; template problems are the client's (400), not the server's."""
    conversation = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            entry["name"] = m.name
        conversation.append(template_message(entry, m))
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise OpenAIError("The model's tokenizer has no chat template: pass --chat-template or use "
                          "/v1/completions.")
    try:
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, chat_template=chat_template,
            **({"tools": tools} if tools else {}), **(chat_template_kwargs or {}),
        )
    except OpenAIError:
        raise
    except Exception as exc:
        raise OpenAIError(f"Could not apply the chat template: {exc}", param="messages") from None


def chat_logprobs(ctx: ServingContext, token_ids: list[int], rows: list[dict[int, Logprob]],
                  num_top: int) -> ChatChoiceLogprobs:
    """OpenAI's chat logprobs: each token with its logprob and bytes, and the ``num_top`` most likely tokens."""
    content = []
    for token_id, row in zip(token_ids, rows):
        chosen = row.get(token_id)
        token = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None \
            else ctx.token_str(token_id)
        top = sorted(((tid, lp) for tid, lp in row.items() if lp.rank is not None and lp.rank <= num_top),
                     key=lambda item: item[1].rank) if num_top else []
        content.append(ChatLogprobContent(
            token=token,
            logprob=clamp_logprob(chosen.logprob) if chosen is not None else -9999.0,
            bytes=list(token.encode("utf-8", errors="replace")),
            top_logprobs=[_chat_logprob(ctx, tid, lp) for tid, lp in top],
        ))
    return ChatChoiceLogprobs(content=content)


def _chat_logprob(ctx: ServingContext, token_id: int, lp: Logprob) -> ChatLogprob:
    token = lp.decoded_token if lp.decoded_token is not None else ctx.token_str(token_id)
    return ChatLogprob(token=token, logprob=clamp_logprob(lp.logprob),
                       bytes=list(token.encode("utf-8", errors="replace")))


class ChatServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        ctx = self.ctx
        ctx.check_model(request.model)
        request.check(ctx.max_logprobs)
        ctx.check_engine()
        tokenizer = ctx.require_tokenizer()
        tools = plan_tool_calls(request, ctx.enable_auto_tool_choice, ctx.tool_call_parser)
        prompt = render_chat(tokenizer, request.messages, request.add_generation_prompt,
                             request.continue_final_message, request.chat_template, request.chat_template_kwargs,
                             tools.template_tools if tools is not None else None)
        prompt_ids = await ctx.encode(prompt, request.add_special_tokens)
        params = request.to_sampling_params(len(prompt_ids), ctx.max_model_len, ctx.default_sampling,
                                            ctx.max_logprobs)
        if tools is not None:
            tools.apply(params)
        ctx.check_sampling_params(params)
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

    async def _full(self, request: ChatCompletionRequest, request_id: str, created: int, prompt: str,
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
                logprobs = chat_logprobs(self.ctx, seq.token_ids, seq.logprobs, request.top_logprobs or 0)
            message = ChatResponseMessage(role=role, content=echo_text + seq.text)
            finish_reason = seq.finish_reason
            if tools is not None:
                content, message.tool_calls = tools.extract(seq.text)
                message.content = content if content is None else echo_text + content
                if message.tool_calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
            choices.append(ChatCompletionChoice(
                index=seq.index, message=message,
                logprobs=logprobs, finish_reason=finish_reason, stop_reason=seq.stop_reason,
            ))
            completion_tokens += len(seq.token_ids)
        return json_response(ChatCompletionResponse(
            id=request_id, created=created, model=self.ctx.model_name, choices=choices,
            usage=UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                            total_tokens=len(prompt_ids) + completion_tokens),
            prompt_logprobs=self.ctx.prompt_logprobs_json(final.prompt_logprobs)
            if request.prompt_logprobs is not None else None,
        ))

    async def _stream(self, request: ChatCompletionRequest, request_id: str, created: int, prompt: str,
                      prompt_ids: list[int], params, role: str, echo_text: str,
                      tools: ToolPlan | None = None) -> AsyncIterator[str]:
        model = self.ctx.model_name
        num_prompt_tokens = len(prompt_ids)
        completion_tokens = 0

        def chunk(choice: ChatCompletionStreamChoice) -> str:
            c = ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=[choice])
            if request.continuous_usage:
                c.usage = UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=completion_tokens,
                                    total_tokens=num_prompt_tokens + completion_tokens)
            return c.to_json()

        streamers = [tools.streamer() for _ in range(params.n)] if tools is not None else None
        try:
            # The first chunk of each choice carries the role (and the echoed message, if asked).
            for index in range(params.n):
                yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role=role, content="")))
                if echo_text:
                    yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(content=echo_text)))
            async for _, out in merge_async_iterators(
                    self.ctx.client.generate(request_id, prompt, prompt_ids, params, stream_deltas=True,
                                             cache_salt=request.cache_salt)):
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
                        yield chunk(ChatCompletionStreamChoice(
                            index=seq.index, delta=DeltaMessage(content=content or ("" if not tool_deltas else None),
                                                                tool_calls=tool_deltas or None),
                            finish_reason=finish_reason, stop_reason=seq.stop_reason))
                        continue
                    if not seq.text and seq.finish_reason is None and not (request.logprobs and seq.token_ids):
                        continue
                    logprobs = None
                    if request.logprobs and seq.logprobs is not None:
                        logprobs = chat_logprobs(self.ctx, seq.token_ids, seq.logprobs, request.top_logprobs or 0)
                    yield chunk(ChatCompletionStreamChoice(
                        index=seq.index, delta=DeltaMessage(content=seq.text), logprobs=logprobs,
                        finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                    ))
            if request.include_usage:
                yield ChatCompletionStreamResponse(
                    id=request_id, created=created, model=model, choices=[],
                    usage=UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=completion_tokens,
                                    total_tokens=num_prompt_tokens + completion_tokens),
                ).to_json()
        except Exception as exc:
            yield error_event(exc)
