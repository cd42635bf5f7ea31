"""OpenAI-compatible request and response schemas (pydantic), and their mapping to ``SamplingParams``.

Field names, defaults and vLLM's extra sampling fields follow vLLM's ``protocol.py`` so clients can switch.
Every validation failure becomes an ``OpenAIError`` (HTTP 400) naming the offending parameter.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from ipc.messages import SamplingParamError, SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EMPTY_PROMPT = "Either prompt or prompt_embeds must be provided and non-empty."  # vLLM's wording
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs; the server passes its own (negative: no limit)


WHOLE_VOCABULARY = -1  # vLLM's logprobs/top_logprobs/prompt_logprobs value for "every token"


def check_max_logprobs(value: int | None, max_logprobs: int, param: str, vocab_size: int | None = None) -> int | None:
    """The logprob count asked for, -1 resolved to the vocabulary size (vLLM's rule); a 400 naming ``param``
    when it is below -1 or more than --max-logprobs (negative: no limit)."""
    if value is None:
        return None
    if value < WHOLE_VOCABULARY:
        raise OpenAIError(f"{param} must be non-negative, or -1 for the whole vocabulary, got {value}.", param=param)
    if value == WHOLE_VOCABULARY:
        if vocab_size is None:
            raise OpenAIError(f"{param}=-1 (the whole vocabulary) needs the model's vocabulary size.", param=param)
        if 0 <= max_logprobs < vocab_size:
            raise OpenAIError(f"{param}=-1 asks for the whole vocabulary ({vocab_size} tokens), more than the "
                              f"server's --max-logprobs ({max_logprobs}); start it with --max-logprobs -1 or "
                              f"{vocab_size} to allow it.", param=param)
        return vocab_size
    if 0 <= max_logprobs < value:
        raise OpenAIError(f"{param} must be at most {max_logprobs} (the server's --max-logprobs), got {value}.",
                          param=param)
    return value


class OpenAIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    _TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
              413: "RequestTooLargeError", 500: "InternalServerError", 503: "ServiceUnavailableError"}

    def __init__(self, message: str, status_code: int = 400, param: str | None = None,
                 err_type: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.err_type = err_type or self._TYPES.get(status_code, "Error")
        self.code = code  # OpenAI's error code string (e.g. "model_not_found"); default: the HTTP status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.code or self.status_code}}


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIBase(BaseModel):
    # Unknown fields are ignored (as OpenAI and vLLM do), so newer clients keep working.
    model_config = ConfigDict(extra="ignore")


class _Response(msgspec.Struct, kw_only=True):
    """Response bodies: msgspec Structs, built and encoded to JSON in ~1 us where a pydantic model takes ~15 us —
    that is per streamed token. (Requests stay pydantic: they need validation.)"""

    def to_json(self) -> str:
        return _json_encoder.encode(self).decode()


_json_encoder = msgspec.json.Encoder()


class StreamOptions(OpenAIBase):
    # Usage goes out only when asked: ``stream_options: {}`` streams no usage chunk (OpenAI's and vLLM's rule).
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingFields(OpenAIBase):
    """Sampling fields shared by completions and chat, with vLLM's extras."""

    model: str | None = None
    n: int = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # vLLM's bounds: the message names them
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    echo: bool = False
    add_special_tokens: bool = True
    request_id: str | None = None
    cache_salt: str | None = None  # vLLM's: prompts share prefix-cache blocks only with requests of the same salt
    # vLLM's extras for token-level clients: ids in the response, logprob tokens spelled ``token_id:N``.
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    # Keep only the last (truncation_side "left", the default) or first ("right") N prompt tokens; -1: the
    # model's context length.
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    # vLLM's extras: only these ids may be sampled; words never generated; logprobs of chosen ids in place of
    # the top-N (needs logprobs on).
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logprob_token_ids: list[int] | None = None
    # Accepted by vLLM, not implemented by pagedserve: refused by name (400), never silently ignored.
    use_beam_search: bool = False
    # Structured outputs (frontend/structured_outputs.py): vLLM's object, its older guided_* fields, OpenAI's
    # response_format (a field of both endpoints, as in vLLM).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None

    def _sampling_params(self, max_tokens: int, logprobs: int | None, default_max: bool,
                         defaults: dict[str, Any] | None, max_logprobs: int,
                         vocab_size: int | None = None) -> SamplingParams:
        """``defaults``: the server's sampling defaults (``--generation-config``) for the fields left unset.
        ``logprobs``: the count already resolved (-1 -> the vocabulary); ``vocab_size`` resolves prompt_logprobs."""
        if self.cache_salt is not None and not self.cache_salt:  # not a sampling field; checked here for both APIs
            raise OpenAIError("Parameter 'cache_salt' must be a non-empty string if provided.", param="cache_salt")
        defaults = defaults or {}
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError("best_of is not supported (only best_of == n).", param="best_of")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError("stream_options can only be set when stream is true.", param="stream_options")
        prompt_logprobs = check_max_logprobs(self.prompt_logprobs, max_logprobs, "prompt_logprobs", vocab_size)
        if self.logprob_token_ids:
            if logprobs is None:
                raise OpenAIError("logprob_token_ids needs logprobs to be requested (logprobs set).",
                                  param="logprob_token_ids")
            check_max_logprobs(len(self.logprob_token_ids), max_logprobs, "logprob_token_ids")
        if "max_tokens" in defaults:  # vLLM caps every request's max_tokens by the generation config's
            max_tokens = min(max_tokens, defaults["max_tokens"])
        if self.prompt_logprobs is not None and self.stream:
            raise OpenAIError("prompt_logprobs is not available when stream is true.", param="prompt_logprobs")
        check_unsupported_extras(self)
        from frontend.structured_outputs import structured_outputs_from_request

        structured_outputs = structured_outputs_from_request(self)
        logit_bias = parse_logit_bias(self.logit_bias)
        try:
            return SamplingParams(
                n=self.n,
                temperature=defaults.get("temperature", 1.0) if self.temperature is None else self.temperature,
                top_p=defaults.get("top_p", 1.0) if self.top_p is None else self.top_p,
                top_k=defaults.get("top_k", 0) if self.top_k is None else self.top_k,
                min_p=defaults.get("min_p", 0.0) if self.min_p is None else self.min_p,
                seed=self.seed,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=(defaults.get("repetition_penalty", 1.0) if self.repetition_penalty is None
                                    else self.repetition_penalty),
                logit_bias=logit_bias,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                stop_token_ids=list(self.stop_token_ids) if self.stop_token_ids else None,
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                logprob_token_ids=list(self.logprob_token_ids) if self.logprob_token_ids else None,
                allowed_token_ids=None if self.allowed_token_ids is None else list(self.allowed_token_ids),
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                structured_outputs=structured_outputs,
            )
        except SamplingParamError as exc:
            param = exc.param
            if param == "max_tokens" and not default_max:
                param = self._max_tokens_name()
            raise OpenAIError(str(exc), param=param) from None
        except (ValueError, TypeError) as exc:
            raise OpenAIError(str(exc)) from None

    def _max_tokens_name(self) -> str:
        return "max_tokens"



def parse_logit_bias(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    """Token id -> bias, each bias clamped to [-100, 100] as vLLM does; a key that is not an integer is a 400."""
    if not logit_bias:
        return None
    parsed = {}
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise OpenAIError(f"Found token_id `{key}` in logit_bias but token_id must be an integer or string "
                              "representing an integer.", param="logit_bias") from None
        parsed[token_id] = min(100.0, max(-100.0, float(bias)))
    return parsed


def check_unsupported_extras(request: _SamplingFields) -> None:
    """vLLM sampling extras pagedserve does not implement: a 400 naming the field rather than ignoring it."""
    if request.use_beam_search:
        raise OpenAIError("use_beam_search is not supported by pagedserve.", param="use_beam_search")
    if request.allowed_token_ids is not None and not request.allowed_token_ids:
        raise OpenAIError("allowed_token_ids is not None and empty!", param="allowed_token_ids")  # vLLM's wording


def truncate_prompt(token_ids: list[int], truncate_prompt_tokens: int | None, truncation_side: str | None,
                    max_model_len: int) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: keep the last N tokens (side "left", the default) or the first N."""
    if truncate_prompt_tokens is None:
        return token_ids
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    if keep > max_model_len:
        raise OpenAIError(f"truncate_prompt_tokens value ({keep}) is greater than max_model_len "
                          f"({max_model_len}). Please request a smaller truncation size.",
                          param="truncate_prompt_tokens")
    if len(token_ids) <= keep:
        return token_ids
    if keep == 0:
        return []
    return token_ids[:keep] if truncation_side == "right" else token_ids[-keep:]


def resolve_max_tokens(requested: int | None, default: int | None, prompt_len: int, max_model_len: int,
                       param: str, prompt_param: str = "prompt") -> tuple[int, bool]:
    """The max_tokens to use and whether it was defaulted; 400 when the request cannot fit the context.

    ``requested`` None: ``default`` capped to the room left, or all the room left when there is no default.
    """
    if prompt_len >= max_model_len:
        raise OpenAIError(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_len} input tokens, which leaves no room for the completion. Please reduce the length of "
            "the input.", param=prompt_param)
    room = max_model_len - prompt_len
    if requested is None:
        return (room if default is None else min(default, room)), True
    if requested < 1:
        raise OpenAIError(f"{param} must be at least 1, got {requested}.", param=param)
    if requested > room:
        raise OpenAIError(
            f"'{param}' is too large: {requested}. This model's maximum context length is {max_model_len} "
            f"tokens and your request has {prompt_len} input tokens ({requested} > {max_model_len} - "
            f"{prompt_len}).", param=param)
    return requested, False


# ------------------------------------------------------------------------------------------------ completions


class CompletionRequest(_SamplingFields):
    # list[int] first: pydantic's smart union picks the same member whatever the order, but validates a 190,000-id
    # prompt in 12 ms instead of 180 ms (the event loop waits on that when the body is small enough to parse inline)
    prompt: list[int] | str | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s): each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            items: list = [p]
        elif not p:
            raise OpenAIError(EMPTY_PROMPT, param="prompt")
        elif all(isinstance(x, int) for x in p):
            items = [list(p)]
        else:
            items = list(p)
        for item in items:
            if (isinstance(item, str) and item == "") or (isinstance(item, list) and not item):
                raise OpenAIError(EMPTY_PROMPT, param="prompt")
        return items

    def to_sampling_params(self, prompt_len: int, max_model_len: int, defaults: dict[str, Any] | None = None,
                           max_logprobs: int = MAX_LOGPROBS, vocab_size: int | None = None) -> SamplingParams:
        if self.suffix:
            raise OpenAIError("suffix is not supported.", param="suffix")
        logprobs = check_max_logprobs(self.logprobs, max_logprobs, "logprobs", vocab_size)
        if "max_tokens" in self.model_fields_set:  # an explicit null means "up to the context length" (vLLM)
            requested, default = self.max_tokens, None
        else:
            requested, default = None, 16
        max_tokens, defaulted = resolve_max_tokens(requested, default, prompt_len, max_model_len, "max_tokens")
        params = self._sampling_params(max_tokens, logprobs, defaulted, defaults, max_logprobs, vocab_size)
        if self.echo and logprobs is not None and params.prompt_logprobs is None:
            params.prompt_logprobs = logprobs  # echoed prompt tokens come with their logprobs
        return params


class CompletionLogprobs(_Response):
    text_offset: list[int] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    tokens: list[str] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = msgspec.field(default_factory=list)


class PromptTokensDetails(_Response):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class RequestMetrics(_Response):
    """``--enable-per-request-metrics``: one request's timing, on its final response (or last usage chunk)."""

    time_to_first_token_s: float | None = None  # arrival to the first generated token
    e2e_latency_s: float = 0.0  # arrival to the last token
    mean_inter_token_latency_s: float | None = None  # over the tokens after the first
    num_cached_prompt_tokens: int = 0


class UsageInfo(_Response):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    # Only with --enable-prompt-tokens-details (left out of the JSON otherwise, as vLLM does).
    prompt_tokens_details: PromptTokensDetails | msgspec.UnsetType = msgspec.UNSET


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None
    # return_token_ids only (left out of the JSON otherwise).
    prompt_token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET


class CompletionResponse(_Response, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    metrics: RequestMetrics | msgspec.UnsetType = msgspec.UNSET  # --enable-per-request-metrics


class CompletionStreamChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # return_token_ids only: the prompt's ids in a choice's first chunk, each chunk's new ids.
    prompt_token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET


class CompletionStreamResponse(_Response, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None
    metrics: RequestMetrics | msgspec.UnsetType = msgspec.UNSET  # --enable-per-request-metrics, last chunk


# ------------------------------------------------------------------------------------------------ chat


class ChatMessage(OpenAIBase):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(f"Unsupported content part type {part.get('type')!r}: only text is supported.",
                                  param="messages")
            pieces.append(part["text"])
        return "\n".join(pieces)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # The prompt already rendered and tokenized (a router that tokenizes, or a return_token_ids round trip): used
    # as is, the template not applied; ``messages`` still give the response's role and the echo.
    prompt_token_ids: list[int] | None = None

    def _max_tokens_name(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def check(self, max_logprobs: int = MAX_LOGPROBS, vocab_size: int | None = None) -> None:
        """Checks that need no tokenizer: run before rendering the template."""
        if not self.messages:
            raise OpenAIError("messages must contain at least one message.", param="messages")
        if self.add_generation_prompt and self.continue_final_message:
            raise OpenAIError("add_generation_prompt and continue_final_message cannot both be true.",
                              param="continue_final_message")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise OpenAIError("top_logprobs requires logprobs to be true.", param="top_logprobs")
            check_max_logprobs(self.top_logprobs, max_logprobs, "top_logprobs", vocab_size)

    def to_sampling_params(self, prompt_len: int, max_model_len: int, defaults: dict[str, Any] | None = None,
                           max_logprobs: int = MAX_LOGPROBS, vocab_size: int | None = None) -> SamplingParams:
        requested = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        max_tokens, defaulted = resolve_max_tokens(requested, None, prompt_len, max_model_len,
                                                   self._max_tokens_name(), prompt_param="messages")
        logprobs = (check_max_logprobs(self.top_logprobs, max_logprobs, "top_logprobs", vocab_size) or 0
                    if self.logprobs else None)
        return self._sampling_params(max_tokens, logprobs, defaulted, defaults, max_logprobs, vocab_size)


class ChatLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobContent(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[ChatLogprob] = msgspec.field(default_factory=list)


class ChatChoiceLogprobs(_Response):
    content: list[ChatLogprobContent] | None = None


class ChatResponseMessage(_Response):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] = msgspec.field(default_factory=list)


class ChatCompletionChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET  # return_token_ids only


class ChatCompletionResponse(_Response, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None
    prompt_token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET  # return_token_ids only
    metrics: RequestMetrics | msgspec.UnsetType = msgspec.UNSET  # --enable-per-request-metrics


class DeltaMessage(_Response, omit_defaults=True):
    """``role`` only in a choice's first chunk (left out of the JSON elsewhere, as OpenAI does); ``content`` always."""

    content: str | None
    role: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's incremental tool-call deltas (frontend/tool_calling.py)


class ChatCompletionStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET  # return_token_ids only


class ChatCompletionStreamResponse(_Response, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET  # return_token_ids: the first chunk
    metrics: RequestMetrics | msgspec.UnsetType = msgspec.UNSET  # --enable-per-request-metrics, last chunk


# ------------------------------------------------------------------------------------------------ other


class TokenizeCompletionRequest(OpenAIBase):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIBase):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(OpenAIBase):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBase):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBase):
    prompt: str


class ModelCard(OpenAIBase):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    task: str | None = None  # generate | embed: what the model serves


class ModelList(OpenAIBase):
    object: Literal["list"] = "list"
    data: list[ModelCard]
