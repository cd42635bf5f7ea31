"""The offline API, shaped like vLLM's ``LLM`` so its users feel at home.

Drives an ``EngineCore`` in-process (no sockets): the same scheduler, runner and sampler as the server, and the
same ``OutputProcessor`` for text, logprobs and stop strings.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from core.model_source import resolve_model
from frontend.generation_config import default_sampling_overrides
from frontend.output_processor import OutputProcessor, RequestOutput
from frontend.structured_outputs import check_structured_outputs
from ipc.config import engine_config_from_kwargs
from ipc.messages import EngineRequest, SamplingParams

PromptType = str | dict[str, Any]


class LLM:
    """``LLM(model=None, **engine_args)``: ``model`` is a HF id, a local directory or a .gguf file; None loads the
    default SmolLM2-135M-Instruct. Engine args are ``EngineConfig``'s fields (``ipc/config.py``), with vLLM's names
    (``dtype``, ``max_model_len``, ``max_num_seqs``, ``max_num_batched_tokens``, ``gpu_memory_utilization``, ...);
    an unknown or ill-typed one raises ``TypeError`` listing the valid ones."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        from core.pooling_engine import create_engine_core  # the offline LLM runs the core in-process

        self.config = engine_config_from_kwargs(model=model, **engine_args)
        self.engine = create_engine_core(self.config)  # an EngineCore, or the embedding engine (task="embed")
        source = resolve_model(model, self.config.revision)
        self.default_sampling = default_sampling_overrides(self.config.generation_config, source)
        self.tokenizer = None
        if not self.config.skip_tokenizer_init:
            from core.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(source, self.config.tokenizer, self.config.chat_template)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """``SamplingParams()``, with ``generation_config``'s defaults when it is ``auto`` or a folder (vLLM's)."""
        return SamplingParams(**self.default_sampling)

    def embed(self, prompts, *, truncate_prompt_tokens: int | None = None, dimensions: int | None = None,
              use_tqdm: bool = True):
        """One ``EmbeddingRequestOutput`` per prompt (strings, ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}``),
        in order; needs an embedding model (or ``task="embed"``). See frontend/offline_embed.py."""
        from frontend.offline_embed import embed

        return embed(self, prompts, truncate_prompt_tokens=truncate_prompt_tokens, dimensions=dimensions,
                     use_tqdm=use_tqdm)

    # ------------------------------------------------------------------------------------------------ generate
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, in order. Prompts are strings, ``{"prompt": str}`` or
        ``{"prompt_token_ids": [...]}``."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = self._params_per_prompt(sampling_params, len(prompts))
        encoded = [self._encode(p) for p in prompts]
        return self._run(encoded, params_list, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (a list of messages) or several."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer; it was skipped (skip_tokenizer_init=True).")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
            )
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            prompts.append((text, ids))
        params_list = self._params_per_prompt(sampling_params, len(prompts))
        return self._run(prompts, params_list, use_tqdm)

    # ------------------------------------------------------------------------------------------------ internals
    def _params_per_prompt(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * n
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * n
        else:
            params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"Got {len(params)} sampling params for {n} prompts.")
        limit = self.config.max_logprobs
        vocab = self.engine.ready_message().vocab_size
        for p in params:
            for name, value in (("logprobs", p.logprobs), ("prompt_logprobs", p.prompt_logprobs)):
                count = vocab if value == -1 else value  # -1: the whole vocabulary (vLLM)
                if count is not None and 0 <= limit < count:
                    raise ValueError(f"{name}={value} asks for {count} logprobs, more than max_logprobs={limit}.")
        return params

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if not isinstance(prompt, str):
            raise TypeError(f"A prompt is a string or a dict with 'prompt' or 'prompt_token_ids', got {type(prompt)}.")
        if self.tokenizer is None:
            raise ValueError("Text prompts need a tokenizer (skip_tokenizer_init=True): pass prompt_token_ids.")
        return prompt, self.tokenizer.encode(prompt)

    def _run(
        self, prompts: list[tuple[str | None, list[int]]], params_list: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        if self.engine.ready_message().embedding is not None:
            raise ValueError(f"Model '{self.config.model}' is an embedding model: use embed(), not generate()/chat().")
        order: dict[str, int] = {}
        try:
            for i, ((text, ids), params) in enumerate(zip(prompts, params_list)):
                if params.structured_outputs is not None:
                    check_structured_outputs(params.structured_outputs)  # a bad schema raises before any work
                request_id = str(next(self._ids))
                self.engine.add_request(EngineRequest(request_id, ids, params))
                self.processor.add_request(request_id, text, ids, params, final_only=True)
                order[request_id] = i
        except ValueError:  # a bad prompt: take back the ones already queued, so the batch is all or nothing
            self._abort(list(order))
            raise
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = _progress_bar(len(prompts)) if use_tqdm else None
        generated = 0
        start = time.perf_counter()
        try:
            while self.engine.has_work():
                step = self.engine.step()
                if step.errors:  # a request failed in the core (its grammar, or a step blamed on it): say so
                    failed = step.errors[0]
                    raise (RuntimeError if failed.internal else ValueError)(
                        f"Prompt {order.get(failed.request_id, '?')} failed: {failed.message}")
                processed = self.processor.process_outputs(step.outputs)
                if processed.to_abort:
                    request_ids, indices = zip(*processed.to_abort)
                    self.engine.abort_requests(list(request_ids), list(indices))
                generated += sum(len(o.new_token_ids) for o in step.outputs)
                for out in processed.request_outputs:
                    if out.finished and out.request_id in order:
                        results[order.pop(out.request_id)] = out
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix_str(f"{generated / (time.perf_counter() - start):.0f} tok/s")
        except BaseException:  # e.g. Ctrl-C: leave the engine clean for the next call
            self._abort(list(order))
            raise
        finally:
            if bar is not None:
                bar.close()
        return [r for r in results if r is not None]

    def _abort(self, request_ids: list[str]) -> None:
        self.engine.abort_requests(request_ids)
        for request_id in request_ids:
            self.processor.abort_request(request_id)
        while self.engine.has_work():
            self.engine.step()


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
