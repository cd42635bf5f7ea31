"""``LLM.embed``: embeddings offline, through the in-process embedding engine (the same scheduler and runner the
server's engine process uses)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from frontend.embeddings import (
    EmbeddingOutput,
    EmbeddingRequestOutput,
    check_dimensions,
    check_length,
    check_truncate,
    tokenize_truncated,
    to_vector,
)
from ipc.messages import EngineRequest, SamplingParams

if TYPE_CHECKING:
    from frontend.llm import LLM

EmbedPrompt = str | dict[str, Any]


def embed(llm: "LLM", prompts: EmbedPrompt | Sequence[EmbedPrompt], *, truncate_prompt_tokens: int | None = None,
          dimensions: int | None = None, use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
    info = llm.engine.ready_message().embedding
    if info is None:
        raise ValueError(f"Model '{llm.config.model}' is a generation model: embed() needs an embedding model, or "
                         "task='embed' to pool a decoder's last token.")
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    max_len = llm.engine.max_model_len
    check_dimensions(dimensions, info, llm.config.model or "")
    truncate_to = check_truncate(truncate_prompt_tokens, max_len)
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
            ids = ids[-truncate_to:] if truncate_to is not None else ids
        else:
            text = prompt["prompt"] if isinstance(prompt, dict) else prompt
            if not isinstance(text, str):
                raise TypeError(f"A prompt is a string or a dict with 'prompt' or 'prompt_token_ids', got "
                                f"{type(text)}.")
            if llm.tokenizer is None:
                raise ValueError("Text prompts need a tokenizer (skip_tokenizer_init=True): pass prompt_token_ids.")
            ids = (tokenize_truncated(llm.tokenizer, text, truncate_to) if truncate_to is not None
                   else llm.tokenizer.encode(text))
        check_length(ids, max_len, i)
        encoded.append(ids)

    base = f"embed-{time.monotonic_ns()}-"
    order = {}
    params = SamplingParams(max_tokens=1)
    try:
        for i, ids in enumerate(encoded):
            request_id = base + str(i)
            llm.engine.add_request(EngineRequest(request_id, ids, params))
            order[request_id] = i
    except ValueError:
        llm.engine.abort_requests(list(order))
        raise
    results: list[EmbeddingRequestOutput | None] = [None] * len(encoded)
    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(encoded), desc="Embedded prompts", dynamic_ncols=True)
    try:
        while llm.engine.has_work():
            for out in llm.engine.step().outputs:
                i = order.pop(out.request_id, None)
                if i is None or out.embedding is None:
                    continue
                vector = to_vector(out.embedding, dimensions, info)
                results[i] = EmbeddingRequestOutput(out.request_id, EmbeddingOutput(vector.tolist()), encoded[i])
                if bar is not None:
                    bar.update(1)
    except BaseException:
        llm.engine.abort_requests(list(order))
        while llm.engine.has_work():
            llm.engine.step()
        raise
    finally:
        if bar is not None:
            bar.close()
    return [r for r in results if r is not None]
