"""Every message that crosses the frontend <-> engine-core process boundary.

msgspec Structs encoded as msgpack arrays (``array_like``) so a message costs a few bytes of framing and
decodes without building dicts. The frontend and the offline ``LLM`` build the same structs, so the
in-process engine and the engine process speak one language.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from ipc.config import EngineConfig  # noqa: F401  (re-exported: it crosses the boundary too)


class FinishReason(enum.IntEnum):
    """Why a sequence ended. Integers on the wire; ``str()`` gives the OpenAI spelling."""

    STOP = 0  # EOS, a stop token id or (frontend) a stop string
    LENGTH = 1  # max_tokens or max_model_len reached
    ABORT = 2  # aborted by the client or the frontend

    def __str__(self) -> str:
        return ("stop", "length", "abort")[self.value]


class StructuredOutputsParams(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    """A constraint on the output (vLLM's ``structured_outputs``): exactly one of the fields is set.

    ``json`` is a JSON schema (its text, or a dict that is serialized), ``json_object`` any JSON object, ``regex`` a
    regular expression, ``choice`` one of these strings, ``grammar`` an EBNF (GBNF) grammar. The engine compiles it
    with xgrammar and masks every step's logits to the tokens the grammar allows.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            self.json = _json_encoder.encode(self.json).decode()
        kinds = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            kinds.append("json_object")
        _check(len(kinds) == 1, "structured_outputs",
               f"structured_outputs needs exactly one of json, json_object, regex, choice, grammar; got {kinds or 'none'}.")
        if self.choice is not None:
            _check(bool(self.choice) and all(isinstance(c, str) for c in self.choice), "structured_outputs",
                   "structured_outputs.choice must be a non-empty list of strings.")

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what the grammar cache is keyed by."""
        if self.json is not None:
            return "json", self.json
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", _json_encoder.encode(self.choice).decode()
        if self.grammar is not None:
            return "grammar", self.grammar
        return "json_object", ""


_json_encoder = msgspec.json.Encoder()


class SamplingParams(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    """Sampling parameters, with vLLM's names and defaults.

    Validated on construction (and on decode), raising ``ValueError`` with a message fit for an HTTP 400.
    ``stop`` strings, ``skip_special_tokens`` and ``include_stop_str_in_output`` are applied by the frontend
    (it has the text); everything else is applied by the engine core.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs of each sampled token (0: the sampled token's only)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's: logprobs of these ids at each sampled position, in place of the top-N (needs ``logprobs`` set).
    logprob_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None  # only these ids may be sampled (a logit mask)
    # vLLM's bad_words, tokenized by the frontend: a one-token word is never sampled; a longer one's last token
    # is masked when the output ends with the rest of it.
    bad_words_token_ids: list[list[int]] | None = None
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding (core/structured_output/)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"n must be at least 1, got {self.n}.")
        _check(self.temperature >= 0.0, "temperature", f"temperature must be non-negative, got {self.temperature}.")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        _check(self.top_k >= 0, "top_k", f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        _check(self.repetition_penalty > 0.0, "repetition_penalty",
               f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"max_tokens must be at least 1, got {self.max_tokens}.")
        _check(self.min_tokens >= 0, "min_tokens", f"min_tokens must be non-negative, got {self.min_tokens}.")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        _check(self.logprobs is None or self.logprobs >= -1, "logprobs",
               f"logprobs must be non-negative, or -1 for the whole vocabulary, got {self.logprobs}.")
        _check(self.prompt_logprobs is None or self.prompt_logprobs >= -1, "prompt_logprobs",
               f"prompt_logprobs must be non-negative, or -1 for the whole vocabulary, got {self.prompt_logprobs}.")
        if self.seed is not None:
            _check(-(2**63) <= self.seed < 2**64, "seed", f"seed out of range: {self.seed}.")
        for name in _INT64_FIELDS:  # the core puts these in int64 tensors: a bigger value would crash a step
            value = getattr(self, name)
            _check(value is None or -(2**63) <= value < 2**63, name,
                   f"{name} must fit in a signed 64-bit integer, got {value}.")
        if self.stop_token_ids:
            _check(all(0 <= t < 2**63 for t in self.stop_token_ids), "stop_token_ids",
                   "stop_token_ids must be non-negative token ids.")
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                _check(-100.0 <= bias <= 100.0, "logit_bias",
                       f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}.")
        if self.stop:
            _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty.")
        for name in ("logprob_token_ids", "allowed_token_ids"):
            ids = getattr(self, name)
            if ids is not None:
                _check(len(ids) > 0, name, f"{name} must not be empty.")
                _check(all(0 <= t < 2**63 for t in ids), name, f"{name} must hold non-negative token ids.")
        if self.logprob_token_ids is not None:
            _check(self.logprobs is not None, "logprob_token_ids", "logprob_token_ids needs logprobs to be set.")
        if self.bad_words_token_ids:
            _check(all(w and all(0 <= t < 2**63 for t in w) for w in self.bad_words_token_ids), "bad_words",
                   "bad_words must tokenize to non-empty lists of token ids.")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_penalties(self) -> bool:
        """Presence, frequency or repetition penalty: sampling then needs the output token ids themselves."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def reads_output_tokens(self) -> bool:
        """Sampling reads the output so far (penalties, a bad word of several tokens): with async scheduling the
        step in flight must finish first."""
        return self.uses_penalties or (self.bad_words_token_ids is not None
                                       and any(len(w) > 1 for w in self.bad_words_token_ids))

    @property
    def uses_token_masks(self) -> bool:
        """allowed_token_ids or bad_words: the sampler masks logits for this row."""
        return self.allowed_token_ids is not None or bool(self.bad_words_token_ids)

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])


_INT64_FIELDS = ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs")


class SamplingParamError(ValueError):
    """A sampling parameter outside its range; ``param`` names it for the OpenAI error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise SamplingParamError(param, message)


# ----------------------------------------------------------------------------------------------------------
# frontend -> engine core


class EngineRequest(msgspec.Struct, tag="add", array_like=True, omit_defaults=True, gc=False):
    """A new request. ``n > 1`` is expanded in the core into n sequences that share the prompt's KV blocks."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    cache_salt: str | None = None  # isolates this request's prefix-cache entries from other salts (tenants)
    client_index: int = 0  # which API process sent it (--api-server-count): its outputs go back there


class AbortRequests(msgspec.Struct, tag="abort", array_like=True, gc=False):
    """Stop these requests and free their blocks; the core answers with ABORT outputs.

    ``indices`` (parallel to ``request_ids``) stops one sequence of an n > 1 request (a stop string hit it);
    None stops every sequence.
    """

    request_ids: list[str]
    indices: list[int] | None = None


class UtilityRequest(msgspec.Struct, tag="utility", array_like=True, gc=False):
    """Call ``EngineCore.<name>(*args)`` in the core process; the reply is a ``UtilityOutput`` with ``call_id``."""

    call_id: int
    name: str
    args: list[Any] = []
    client_index: int = 0  # the calling API process (--api-server-count): the reply goes back there


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True, gc=False):
    pass


EngineInput = EngineRequest | AbortRequests | UtilityRequest | Shutdown


# ----------------------------------------------------------------------------------------------------------
# engine core -> frontend


class Logprobs(msgspec.Struct, array_like=True, gc=False):
    """Logprobs of consecutive positions. Row i: column 0 is the chosen token, then the top-N by logprob.

    ``ranks[i]`` is the chosen token's rank in the vocabulary (1 = most likely).
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


class EngineOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one sequence produced in one step. ``index`` is the sequence's place among the request's ``n``."""

    request_id: str
    new_token_ids: list[int]
    index: int = 0
    new_logprobs: Logprobs | None = None
    prompt_logprobs: Logprobs | None = None  # sent once, with the first token; row 0 is the first prompt token
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id that ended the sequence
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    embedding: bytes | None = None  # pooling models: the sequence's embedding, float32 little-endian
    queue_time_s: float = 0.0  # with the first output: arrival in the core to first scheduling

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, array_like=True, gc=False):
    """A snapshot after a step; the counters are deltas since the previous stats message."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up (first scheduling only, never a recompute)
    prefix_cache_hits: int = 0  # of those, tokens found in the cache
    num_batched_tokens: int = 0  # tokens computed by the step (prefill + decode)
    # speculative decoding (vLLM's vllm:spec_decode_* counters)
    spec_num_drafts: int = 0  # sequences that verified drafts
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_tokens_per_pos: list[int] = []  # accepted drafts at each draft position


class UtilityOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    call_id: int
    result: Any = None
    error: str | None = None
    client_index: int = 0  # the API process that called


class RequestError(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """``EngineCore.add_request`` refused the request (its ``ValueError``), or its grammar failed to compile in the
    core (``param="structured_outputs"``); the frontend answers HTTP 400. ``internal``: the request failed inside an
    engine step (not its input's fault, core/step_recovery.py); the frontend answers HTTP 500."""

    request_id: str
    message: str
    param: str | None = None
    internal: bool = False


class EngineOutputs(msgspec.Struct, tag="outputs", array_like=True, omit_defaults=True, gc=False):
    """Everything one step produced, batched into one message."""

    outputs: list[EngineOutput] = []
    scheduler_stats: SchedulerStats | None = None
    utility_output: UtilityOutput | None = None
    timestamp: float = 0.0
    errors: list[RequestError] = []


class ReadyMessage(msgspec.Struct, tag="ready", array_like=True, gc=False):
    """The core's handshake: sent once the model is loaded and the KV cache sized, before any traffic."""

    model: str
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    vocab_size: int
    eos_token_ids: list[int]
    device: str
    embedding: EmbeddingInfo | None = None  # set when the engine is an embedding (pooling) engine


class EmbeddingInfo(msgspec.Struct, array_like=True, gc=False):
    """What the frontend needs to serve ``/v1/embeddings``: the vector size, whether vectors are L2-normalised,
    and whether (and to which sizes) they may be truncated (Matryoshka models)."""

    size: int
    normalize: bool
    is_matryoshka: bool = False
    matryoshka_dimensions: list[int] | None = None  # None with is_matryoshka: any size up to ``size``


class EngineDead(msgspec.Struct, tag="dead", array_like=True, gc=False):
    """Sent by the core, when it can, as it dies of an error."""

    error: str


EngineMessage = EngineOutputs | ReadyMessage | EngineDead
