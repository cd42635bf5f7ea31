"""Usage accounting for completions and chat: when a usage object goes out, and what it holds.

The server's flags (``--enable-force-include-usage``, ``--enable-prompt-tokens-details``,
``--enable-per-request-metrics``) and the request's ``stream_options`` decide; both endpoint families call here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from frontend.protocol import PromptTokensDetails, RequestMetrics, StreamOptions, UsageInfo

if TYPE_CHECKING:
    from frontend.output_processor import RequestOutput


@dataclass(frozen=True)
class UsageOptions:
    force_include_usage: bool = False  # a usage chunk ends every stream, asked for or not
    prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens
    per_request_metrics: bool = False  # timing on the final response / usage chunk


def stream_usage_flags(stream_options: StreamOptions | None, force: bool) -> tuple[bool, bool]:
    """(final usage chunk, usage on every chunk) for a stream: only when ``include_usage`` is true (or forced);
    continuous stats only on top of included usage."""
    include = bool(stream_options and stream_options.include_usage) or force
    continuous = include and bool(stream_options and stream_options.continuous_usage_stats)
    return include, continuous


def usage_info(options: UsageOptions, prompt_tokens: int, completion_tokens: int,
               cached_tokens: int = 0) -> UsageInfo:
    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
    if options.prompt_tokens_details:
        usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=cached_tokens)
    return usage


def request_metrics(outputs: list[RequestOutput]) -> RequestMetrics:
    """One response's timing from its requests' final outputs (several prompts: the slowest one's)."""
    arrival = min(o.arrival_time for o in outputs)
    firsts = [o.first_token_time for o in outputs if o.first_token_time is not None]
    last = max(o.last_token_time for o in outputs)
    num_after_first = sum(max(0, o.num_generation_tokens - 1) for o in outputs)
    decode_time = sum(o.last_token_time - o.first_token_time for o in outputs if o.first_token_time is not None)
    return RequestMetrics(
        time_to_first_token_s=(max(firsts) - arrival) if firsts else None,
        e2e_latency_s=max(0.0, last - arrival),
        mean_inter_token_latency_s=(decode_time / num_after_first) if num_after_first else None,
        num_cached_prompt_tokens=sum(o.num_cached_tokens for o in outputs),
    )
