"""``POST /v1/embeddings`` in OpenAI's shape: ``input`` as a string, list of strings, token ids or list of token-id
lists; ``encoding_format`` float or base64; ``dimensions`` for Matryoshka models only; ``usage.prompt_tokens``.
vLLM's ``truncate_prompt_tokens`` (and ``add_special_tokens``) are accepted too."""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import Field

from frontend.embeddings import (
    EmbeddingInputError,
    check_dimensions,
    check_length,
    check_truncate,
    tokenize_truncated,
    to_vector,
)
from frontend.protocol import OpenAIBase, OpenAIError
from frontend.serving_common import ServingContext, engine_error, run_until_disconnect


class EmbeddingRequest(OpenAIBase):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    add_special_tokens: bool = True


class EmbeddingServing:
    def __init__(self, ctx: ServingContext, info) -> None:
        self.ctx = ctx
        self.info = info  # the engine's EmbeddingInfo

    async def _token_ids(self, body: EmbeddingRequest) -> list[list[int]]:
        ctx = self.ctx
        truncate_to = check_truncate(body.truncate_prompt_tokens, ctx.max_model_len)
        raw = body.input
        if isinstance(raw, str):
            raw = [raw]
        if not raw:
            raise EmbeddingInputError("The input is empty: give a string, strings, or token ids.", "input")
        if isinstance(raw[0], int):
            raw = [raw]
        prompts: list[list[int]] = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                if not item:
                    raise EmbeddingInputError(f"Input {i} is an empty string.", "input")
                tokenizer = ctx.require_tokenizer()
                if truncate_to is not None:
                    ids = tokenize_truncated(tokenizer, item, truncate_to)
                else:
                    ids = await ctx.encode(item, body.add_special_tokens)
            else:
                ids = list(item)
                ctx.check_token_ids(ids, param="input")
                if truncate_to is not None:
                    ids = ids[-truncate_to:]
            check_length(ids, ctx.max_model_len, i if len(raw) > 1 else None)
            prompts.append(ids)
        return prompts

    async def create(self, body: EmbeddingRequest, raw_request: Request) -> Response:
        ctx = self.ctx
        ctx.check_model(body.model)
        ctx.check_engine()
        try:
            check_dimensions(body.dimensions, self.info, body.model or ctx.model_name)
            prompts = await self._token_ids(body)
        except EmbeddingInputError as exc:
            raise OpenAIError(str(exc), param=exc.param) from None
        request_id = f"embd-{uuid.uuid4().hex}"

        async def run() -> Response:
            try:
                raws = await asyncio.gather(*(ctx.client.embed(f"{request_id}-{i}", ids)
                                              for i, ids in enumerate(prompts)))
            except Exception as exc:
                raise engine_error(exc) from None
            data = []
            for i, raw in enumerate(raws):
                vector = to_vector(raw, body.dimensions, self.info)
                value = (base64.b64encode(vector.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                         else vector.tolist())
                data.append({"object": "embedding", "index": i, "embedding": value})
            num_tokens = sum(len(p) for p in prompts)
            return json_response_dict({"id": request_id, "object": "list", "model": body.model or ctx.model_name,
                                       "data": data, "usage": {"prompt_tokens": num_tokens,
                                                               "total_tokens": num_tokens}})

        return await run_until_disconnect(raw_request, run())


def json_response_dict(content: dict) -> Response:
    import msgspec

    return Response(msgspec.json.encode(content), media_type="application/json")
