"""``POST /tokenize`` (a prompt or chat messages) and ``POST /detokenize``, shaped like vLLM's."""

from __future__ import annotations

from frontend.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    OpenAIError,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from frontend.serving_chat import render_chat
from frontend.request_limits import check_int_ranges, check_prompt_chars
from frontend.serving_common import ServingContext
from core.tokenizer import encode


class TokenizeServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        ctx = self.ctx
        ctx.check_model(request.model)
        tokenizer = ctx.require_tokenizer()
        if isinstance(request, TokenizeChatRequest):
            if not request.messages:
                raise OpenAIError("messages must contain at least one message.", param="messages")
            if ctx.max_prompt_chars:
                check_prompt_chars(request, ctx.max_prompt_chars)
            text = await render_chat(ctx, request.messages, request.add_generation_prompt,
                                     request.continue_final_message, request.chat_template,
                                     request.chat_template_kwargs)
            param = "messages"
        else:
            text, param = request.prompt, "prompt"
        ctx.check_text_length(text, param)

        def run() -> TokenizeResponse:  # in a worker thread: a long text takes seconds
            ids = encode(tokenizer, text, request.add_special_tokens)
            token_strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
            return TokenizeResponse(count=len(ids), max_model_len=ctx.max_model_len, tokens=ids,
                                    token_strs=token_strs)

        return await ctx.run_blocking(run)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.ctx.check_model(request.model)
        tokenizer = self.ctx.require_tokenizer()
        check_int_ranges(request)
        self.ctx.check_token_ids(request.tokens, param="tokens")
        return DetokenizeResponse(prompt=await self.ctx.run_blocking(tokenizer.decode, request.tokens))
