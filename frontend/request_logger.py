"""``--enable-log-requests``: one INFO line per request (id, prompt length, sampling params, truncated prompt)."""

from __future__ import annotations

import logging

from ipc.messages import SamplingParams

logger = logging.getLogger("pagedserve.requests")


class RequestLogger:
    """``max_log_len`` caps the prompt characters and token ids logged (None: all of them)."""

    def __init__(self, max_log_len: int | None = None) -> None:
        self.max_log_len = max_log_len

    def log(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams) -> None:
        num_prompt_tokens = len(prompt_token_ids)
        limit = self.max_log_len
        if limit is not None:
            prompt = None if prompt is None else prompt[:limit]
            prompt_token_ids = prompt_token_ids[:limit]
        logger.info("Received request %s: prompt length %d, params: %s, prompt: %r, prompt_token_ids: %s",
                    request_id, num_prompt_tokens, params, prompt, prompt_token_ids)
