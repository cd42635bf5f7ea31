"""``EngineConfig``: every engine setting, defined once, with what the CLI and ``LLM(...)`` need to know about it.

Each field carries its type, its default and an ``Arg`` (help, choices, vLLM's short aliases): ``pagedserve
serve|generate`` build their engine flags from this table (``frontend/config_args.py``), ``LLM(**kwargs)``
validates against it (``engine_config_from_kwargs``), and the core reads the struct (derived values are resolved
once, in ``core/config.py: resolve_config``). It lives in ``ipc`` because the frontend hands it to the
engine-core process; it imports nothing of ours and no torch.

``NOT_SUPPORTED_YET`` lists vLLM's flags for features not built yet, so users pasting them get "not supported
yet" instead of "unrecognized": a feature that lands deletes its line there and adds its field here.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# dtype spelling -> canonical torch dtype name. ``core/config.py`` maps the canonical names to torch dtypes.
DTYPE_NAMES: dict[str, str] = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "float16": "float16", "half": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
DTYPES = ("auto", *DTYPE_NAMES)
WEIGHT_FORMATS = ("safetensors", "gguf", "pt")  # what ``core/loader.py`` reads
LOAD_FORMATS = ("auto", *WEIGHT_FORMATS, "dummy")  # dummy: random weights, no files read
DEVICES = ("auto", "cuda", "cpu")
BACKENDS = ("auto", "torch", "triton")
TASKS = ("auto", "generate", "embed")
SPEC_METHODS = ("ngram", "draft_model")
EXECUTOR_BACKENDS = ("mp", "ray")
# KV-cache element types (vLLM's spellings); fp8 = fp8_e4m3: e4m3 values with a per-layer scale for keys and values.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
# core/layers/quantization implements each
QUANTIZATION_METHODS = ("fp8", "awq", "gptq", "gguf", "bitsandbytes", "experts_int8")
# vLLM's names for other kernels of those methods' checkpoints: accepted for a checkpoint of that method, which then
# runs on pagedserve's kernels (core/layers/quantization: REQUESTED_ALIASES)
QUANTIZATION_ALIASES = ("awq_marlin", "gptq_marlin", "compressed-tensors", "modelopt", "modelopt_fp4", "fbgemm_fp8")
QUANTIZATION_CHOICES = (*QUANTIZATION_METHODS, *QUANTIZATION_ALIASES)


class SpeculativeConfig(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """vLLM's ``--speculative-config``: ``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
    "prompt_lookup_min": 2}`` or ``{"method": "draft_model", "model": PATH_OR_ID, "num_speculative_tokens": 3}``.
    vLLM's older spelling names only ``model`` (a draft model, or ``"[ngram]"``). Checks that need the models
    (same vocabulary, long enough context) run at startup: ``core/spec_decode/draft_model.py``."""

    method: str | None = None
    num_speculative_tokens: int | None = None
    model: str | None = None
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    revision: str | None = None  # the draft model's hub revision
    load_format: str | None = None  # the draft's weights format (default: the target's)

    def __post_init__(self) -> None:
        if self.method is None:
            if self.model is None:
                raise ValueError("speculative_config needs a 'method' (ngram or draft_model) or a draft 'model'.")
            self.method = "ngram" if self.model == "[ngram]" else "draft_model"
        if self.method == "[ngram]":
            self.method = "ngram"
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative_config: unknown method {self.method!r}; supported: "
                             f"{', '.join(SPEC_METHODS)}.")
        if self.num_speculative_tokens is None:
            raise ValueError("speculative_config needs 'num_speculative_tokens' (the drafts per step, >= 1).")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"speculative_config: num_speculative_tokens must be >= 1, got "
                             f"{self.num_speculative_tokens}.")
        if self.method == "ngram":
            if self.model not in (None, "[ngram]"):
                raise ValueError("speculative_config: method ngram takes no draft 'model'.")
            self.model = None
            if self.prompt_lookup_max is None and self.prompt_lookup_min is None:
                self.prompt_lookup_max = self.prompt_lookup_min = 5  # vLLM's default
            elif self.prompt_lookup_min is None:
                self.prompt_lookup_min = self.prompt_lookup_max
            elif self.prompt_lookup_max is None:
                self.prompt_lookup_max = self.prompt_lookup_min
            if self.prompt_lookup_min < 1:
                raise ValueError(f"speculative_config: prompt_lookup_min must be >= 1, got {self.prompt_lookup_min}.")
            if self.prompt_lookup_min > self.prompt_lookup_max:
                raise ValueError(f"speculative_config: prompt_lookup_min={self.prompt_lookup_min} is larger than "
                                 f"prompt_lookup_max={self.prompt_lookup_max}.")
        else:
            if not self.model:
                raise ValueError("speculative_config: method draft_model needs the draft 'model' (path or id).")
            if self.prompt_lookup_max is not None or self.prompt_lookup_min is not None:
                raise ValueError("speculative_config: prompt_lookup_max/min apply to method ngram only.")
            if self.load_format is not None and self.load_format not in LOAD_FORMATS:
                raise ValueError(f"speculative_config: load_format must be one of {', '.join(LOAD_FORMATS)}.")


def parse_speculative_config(value: Any) -> SpeculativeConfig | None:
    """A JSON string (the CLI), a dict (``LLM(...)``) or a ``SpeculativeConfig`` -> the validated struct."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, (str, bytes)):
        try:
            value = msgspec.json.decode(value)
        except msgspec.DecodeError as exc:
            raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise TypeError(f"speculative_config must be a JSON object, got {value!r}.")
    try:
        return msgspec.convert(value, SpeculativeConfig)
    except msgspec.ValidationError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith("speculative_config") else f"speculative_config: {message}"
                         ) from None


@dataclass(frozen=True)
class Arg:
    """How a config field appears on the command line (``--field-name``, vLLM's spelling) and in ``--help``."""

    help: str
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()  # extra spellings, e.g. vLLM's "-tp"
    negative_aliases: tuple[str, ...] = ()  # bool fields: extra flags that set False (vLLM's "--disable-...")
    nargs: str | None = None  # "+" for list-valued fields
    metavar: str | None = None
    parse: Any = None  # text/dict -> the field's value (fields given as JSON on the command line)


class EngineConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Engine arguments, with vLLM's names. ``model=None`` means the default model (SmolLM2-135M-Instruct)."""

    model: Annotated[str | None, Arg(
        f"Hugging Face id, local directory or .gguf file (default: {DEFAULT_MODEL}).")] = None
    tokenizer: Annotated[str | None, Arg("Tokenizer to use instead of the model's (id, directory or .gguf).")] = None
    revision: Annotated[str | None, Arg(
        "Hub revision (branch, tag or commit) of the model and tokenizer; local files ignore it.")] = None
    served_model_name: Annotated[str | list[str] | None, Arg(
        "Model name(s) the API answers to (default: MODEL); the first is reported.", nargs="+")] = None
    dtype: Annotated[str, Arg(
        "Weight and activation dtype. auto: the checkpoint's on GPU (float32 checkpoints run in bfloat16), "
        "float32 on CPU.", choices=DTYPES)] = "auto"
    max_model_len: Annotated[int | None, Arg("Context length (default: the model's).")] = None
    max_num_seqs: Annotated[int, Arg("Most sequences in one batch.")] = 256
    max_num_batched_tokens: Annotated[int | None, Arg(
        "Token budget of one step (default: max(8192, max_model_len)).")] = None
    gpu_memory_utilization: Annotated[float, Arg(
        "Fraction of GPU memory for weights, activations and the KV cache.")] = 0.9
    load_format: Annotated[str, Arg(
        "Weight file format; auto picks from the files; dummy: random weights.", choices=LOAD_FORMATS)] = "auto"
    seed: Annotated[int, Arg("Seed of unseeded sampling and of dummy weights.")] = 0
    skip_tokenizer_init: Annotated[bool, Arg(
        "Load no tokenizer: prompts must be token ids and no text is returned.")] = False
    enforce_eager: Annotated[bool, Arg("Never capture CUDA graphs.")] = False
    enable_pdl: Annotated[bool, Arg(
        "Launch the decode chain's Triton kernels with programmatic dependent launch on Hopper GPUs (each kernel's "
        "launch overlaps the one before it; kernels/pdl.py).")] = True
    block_size: Annotated[int, Arg("Tokens per KV-cache block.")] = 16
    enable_prefix_caching: Annotated[bool, Arg("Reuse the KV blocks of shared prompt prefixes.")] = True
    kv_cache_dtype: Annotated[str, Arg(
        "KV-cache element type. auto: the model dtype; fp8 / fp8_e4m3: e4m3 with a per-layer scale for keys and "
        "values (the checkpoint's k_scale/v_scale (or kv_scale) when it has them, else 1.0): half the bytes of a "
        "16-bit cache, twice the blocks.", choices=KV_CACHE_DTYPES)] = "auto"
    num_gpu_blocks_override: Annotated[int | None, Arg(
        "Fix the number of KV blocks instead of sizing the cache from memory (tests use it to force "
        "preemption).")] = None
    cpu_kv_cache_gib: Annotated[float, Arg(
        "KV-cache size on CPU, where there is no memory to profile.")] = 1.0
    device: Annotated[str, Arg("auto: CUDA when available, else CPU.", choices=DEVICES)] = "auto"
    chat_template: Annotated[str | None, Arg("Chat template: a file or an inline Jinja string.")] = None
    async_scheduling: Annotated[bool | None, Arg(
        "Prepare the next step on the host while the device runs one (default: on with CUDA).")] = None
    enable_chunked_prefill: Annotated[bool | None, Arg(
        "Accepted for vLLM compatibility: chunked prefill is always on here.")] = None
    trust_remote_code: Annotated[bool, Arg(
        "Accepted for vLLM compatibility; no effect: no remote code is ever run here.")] = False
    attention_backend: Annotated[str, Arg(
        "Attention kernels. auto: $PAGEDSERVE_ATTENTION_BACKEND if set, else Triton on CUDA; torch: the "
        "plain-torch reference kernels (for debugging).", choices=BACKENDS)] = "auto"
    kernel_backend: Annotated[str, Arg(
        "Every other kernel (norm, activation, rotary, sampling). auto: $PAGEDSERVE_KERNEL_BACKEND if set, "
        "else Triton on CUDA; torch: the torch references.", choices=BACKENDS)] = "auto"
    max_logprobs: Annotated[int, Arg(
        "Most logprobs a request may ask for (logprobs, top_logprobs, prompt_logprobs); more is a 400.")] = 20
    generation_config: Annotated[str, Arg(
        "Default sampling parameters. vllm: none (the request's or vLLM's defaults); auto: the model's "
        "generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens); "
        "a folder: its generation_config.json. (vLLM's default is auto.)", metavar="{auto,vllm,FOLDER}")] = "vllm"
    task: Annotated[str, Arg(
        "What the model serves. auto: embed for encoder (BERT-family) models, else generate; embed: "
        "/v1/embeddings and LLM.embed (encoders, or a decoder pooling its last token).", choices=TASKS)] = "auto"
    speculative_config: Annotated[SpeculativeConfig | None, Arg(
        "Speculative decoding, as JSON (vLLM's): '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
        "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' or '{\"method\": \"draft_model\", \"model\": "
        "PATH_OR_ID, \"num_speculative_tokens\": 3}'.", metavar="JSON", parse=parse_speculative_config)] = None
    speculative_run_ahead: Annotated[bool | None, Arg(
        "N-gram speculation where async scheduling would be on: after a step that verifies no drafts (no n-gram "
        "match), the next step is scheduled and launched before that step's tokens are read, as with async "
        "scheduling (default: off; it needs method ngram on one device with async scheduling wanted).")] = None
    tensor_parallel_size: Annotated[int, Arg(
        "Devices each layer is split across (one worker process per device; torch.distributed: NCCL on GPU, gloo "
        "on CPU). 1: the model runs in the engine-core process.", aliases=("-tp",))] = 1
    distributed_executor_backend: Annotated[str, Arg(
        "How workers start when tensor_parallel_size * pipeline_parallel_size > 1. mp: local processes; ray: Ray "
        "actors placed by a placement group (one bundle per device), across the nodes of a Ray cluster.",
        choices=EXECUTOR_BACKENDS)] = "mp"
    pipeline_parallel_size: Annotated[int, Arg(
        "Pipeline stages: contiguous blocks of layers, each on its own tensor-parallel group of devices; "
        "activations pass between stages with torch.distributed send/recv.", aliases=("-pp",))] = 1
    pipeline_micro_batches: Annotated[int | None, Arg(
        "Steps in flight at once with pipeline parallelism (default: pipeline_parallel_size, as vLLM's batch "
        "queue): the running requests split into this many groups that flow through the stages back to back, so "
        "no stage waits for the others. 1: one step at a time (each stage idle (P-1)/P of the time).")] = None

    quantization: Annotated[str | None, Arg(
        "Weight quantization. Default: the checkpoint's config.json quantization_config (fp8, fbgemm_fp8, "
        "compressed-tensors float8 / W4A16 / W8A16 / W8A8 / NVFP4, awq, gptq 4- and 8-bit, bitsandbytes 4- and "
        "8-bit, modelopt FP8 / NVFP4). fp8 on an unquantized checkpoint quantizes it at load (per-channel weight "
        "scales, dynamic per-token activation scales); bitsandbytes quantizes it to NF4 in blocks of 64; "
        "experts_int8 quantizes a mixture of experts' experts to int8 per channel. gguf keeps a .gguf file's "
        "Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS weights quantized (opt-in until the block GEMM is measured on "
        "the GPU). awq_marlin, gptq_marlin, compressed-tensors, modelopt, modelopt_fp4 and fbgemm_fp8 (vLLM's "
        "names) are accepted for checkpoints of those methods, which run on pagedserve's kernels.",
        choices=QUANTIZATION_CHOICES, aliases=("-q",))] = None
    gguf_dequantize: Annotated[bool, Arg(
        "Dequantize a .gguf file's weights to the model dtype at load (the path before --quantization gguf; more "
        "memory, cuBLAS GEMMs). This is also the default without --quantization gguf.")] = False

    def __post_init__(self) -> None:
        for name, info in _FIELDS.items():
            choices = info.arg.choices
            value = getattr(self, name)
            if info.arg.parse is not None and value is not None:
                setattr(self, name, info.arg.parse(value))  # a JSON string or dict given to the constructor
            if choices is not None and value is not None and value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.pipeline_micro_batches is not None and self.pipeline_micro_batches < 1:
            raise ValueError(f"pipeline_micro_batches must be >= 1, got {self.pipeline_micro_batches}.")

    @property
    def served_model_names(self) -> list[str]:
        name = self.served_model_name
        if name is None:
            return []
        return [name] if isinstance(name, str) else list(name)


@dataclass(frozen=True)
class ConfigField:
    """One row of a settings table: what the CLI generator and the validator read."""

    name: str
    type: Any  # the annotation without ``Annotated``
    default: Any
    arg: Arg

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def value_type(self) -> type:
        """The scalar type of the field's values (``int`` for ``int | None``, ``str`` for ``str | list[str]``)."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)] or [self.type]
        scalar = next((a for a in args if a in (bool, int, float, str)), str)
        return scalar


def config_fields(cls: type) -> dict[str, ConfigField]:
    """The fields of a settings class (a msgspec Struct or a dataclass) that carry an ``Arg``, in order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    if issubclass(cls, msgspec.Struct):
        defaults = {f.name: f.default for f in msgspec.structs.fields(cls)}
    else:
        import dataclasses

        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(cls)}
    fields = {}
    for name, default in defaults.items():
        hint = hints[name]
        if typing.get_origin(hint) is not Annotated:
            continue
        base, *meta = typing.get_args(hint)
        arg = next((m for m in meta if isinstance(m, Arg)), None)
        if arg is not None:
            fields[name] = ConfigField(name, base, default, arg)
    return fields


_FIELDS = config_fields(EngineConfig)


def engine_config_from_kwargs(**kwargs: Any) -> EngineConfig:
    """An ``EngineConfig`` from keyword arguments (``LLM(**kwargs)``), each checked against the table.

    Unknown names and values of the wrong type raise ``TypeError`` listing the valid names; a value outside a
    field's choices raises ``ValueError``; a feature not built yet raises ``ValueError`` saying so.
    """
    unsupported = {k: v for k, v in kwargs.items() if k in NOT_SUPPORTED_YET}
    for name, value in unsupported.items():
        NOT_SUPPORTED_YET[name].check(name, value)
        del kwargs[name]  # a value that means "off" (tensor_parallel_size=1): accepted, nothing to do
    unknown = sorted(set(kwargs) - set(_FIELDS))
    if unknown:
        raise TypeError(f"Unknown engine argument(s) {unknown}; known: {sorted(set(_FIELDS) - {'model'})}.")
    for name, value in kwargs.items():
        parse = _FIELDS[name].arg.parse
        if parse is not None:
            kwargs[name] = value = parse(value)
        try:
            msgspec.convert(value, _FIELDS[name].type)
        except msgspec.ValidationError as exc:
            raise TypeError(f"Engine argument {name}={value!r}: {exc}; known arguments: "
                            f"{sorted(set(_FIELDS) - {'model'})}.") from None
    try:
        return msgspec.convert(kwargs, EngineConfig)
    except msgspec.ValidationError as exc:  # a choice: __post_init__'s message
        raise ValueError(str(exc)) from None


# ----------------------------------------------------------------------------------------------------------
# vLLM flags for features not built yet


@dataclass(frozen=True)
class NotSupportedYet:
    """A vLLM engine argument pagedserve does not implement yet. ``allowed``: values that mean "feature off" or
    what pagedserve does anyway, accepted and ignored (``-tp 1``, ``--guided-decoding-backend xgrammar``);
    ``switch``: a flag without a value (``--enable-lora``)."""

    feature: str
    aliases: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()
    switch: bool = False
    nargs: str | None = None

    def check(self, name: str, value: Any) -> None:
        if self.switch and value is False:
            return
        if not self.switch and str(value) in self.allowed:
            return
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{flag} ({name}={value!r}) is not supported yet: pagedserve has no {self.feature} yet.")


NOT_SUPPORTED_YET: dict[str, NotSupportedYet] = {
    "enable_lora": NotSupportedYet("LoRA adapters", switch=True),
    "lora_modules": NotSupportedYet("LoRA adapters", nargs="+"),
    "runner": NotSupportedYet("--runner flag (for pooling use --task embed)", allowed=("auto", "generate")),
    "guided_decoding_backend": NotSupportedYet("structured-output backend other than xgrammar",
                                               allowed=("auto", "xgrammar")),
    "structured_outputs_config": NotSupportedYet("structured-outputs settings (the backend is always xgrammar)"),
    "reasoning_parser": NotSupportedYet("reasoning parsers"),
}
