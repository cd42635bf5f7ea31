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
from frontend.serving_common import ServingContext


class TokenizeServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        self.ctx.check_model(request.model)
        tokenizer = self.ctx.require_tokenizer()
        if isinstance(request, TokenizeChatRequest):
            if not request.messages:
                raise OpenAIError("messages must contain at least one message.", param="messages")
            text = render_chat(tokenizer, request.messages, request.add_generation_prompt,
                               request.continue_final_message, request.chat_template, request.chat_template_kwargs)
        else:
            text = request.prompt
        ids = tokenizer.encode(text, add_special_tokens=request.add_special_tokens)
        token_strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.ctx.max_model_len, tokens=ids,
                                token_strs=token_strs)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.ctx.check_model(request.model)
        tokenizer = self.ctx.require_tokenizer()
        self.ctx.check_token_ids(request.tokens, param="tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(request.tokens))
