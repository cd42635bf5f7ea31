"""Model configuration (the HF config fields every family reads; families add theirs in core/models/) and the engine
settings derived from ``EngineConfig`` + the model + the device, resolved once (``resolve_config``; which engine,
generation or embedding, by ``resolve_task``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from core import envs
from kernels.backend import resolve_backends
from ipc.config import DTYPE_NAMES, EngineConfig

if TYPE_CHECKING:
    from core.models.bert import BertConfig

logger = logging.getLogger(__name__)

# HF architecture name -> encoder family (core/models/bert.py), also the checkpoint prefix of the encoder weights
# when a head class wraps them. These models embed (``task`` auto means embed for them).
ENCODER_ARCHITECTURES = {
    "BertModel": "bert",
    "BertForMaskedLM": "bert",
    "RobertaModel": "roberta",
    "RobertaForMaskedLM": "roberta",
    "XLMRobertaModel": "roberta",
    "XLMRobertaForMaskedLM": "roberta",
}

# Every dtype spelling ``EngineConfig.dtype`` accepts (one table: ``ipc/config.py``), as a torch dtype.
_DTYPES = {name: getattr(torch, canonical) for name, canonical in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class ModelConfig:
    """The HF config fields every family has (what the runner and engine read: cache shape, limits, EOS). Each
    family's file (core/models/) parses the HF dict into this or a subclass with its own fields."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str | None
    # Per layer: 0 = full causal attention, W > 0 = only the last W positions (sliding window). Empty: all full.
    sliding_windows: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # The checkpoint's (or --quantization's) weight quantization: a core.layers.quantization QuantConfig, or None.
    quantization: Any = field(default=None, compare=False)

    @property
    def max_model_len(self) -> int:
        """The longest context the checkpoint supports (``BertConfig`` has the same property)."""
        return self.max_position_embeddings

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """The family config of an HF ``config.json`` dict, read by its family (core/models/registry.py), with the
        checkpoint's own ``quantization_config`` resolved (core/layers/quantization)."""
        from core.layers.quantization import resolve_quantization
        from core.models.registry import read_config

        return resolve_quantization(read_config(d), d, None)

    def layer_window(self, layer: int) -> int:
        return self.sliding_windows[layer] if self.sliding_windows else 0


def rope_scaling_from_hf(d: dict[str, Any]) -> dict[str, Any] | None:
    """``rope_scaling`` (old name) or the non-default part of ``rope_parameters`` (transformers 5), with ``rope_type``
    always set; None for plain RoPE."""
    rope = d.get("rope_parameters") or {}
    rope_scaling = d.get("rope_scaling")
    if rope_scaling is None and rope.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if rope_scaling is None:
        return None
    rope_scaling = dict(rope_scaling)
    rope_scaling.setdefault("rope_type", rope_scaling.get("type", "default"))
    if rope_scaling["rope_type"] == "su":  # Phi-3's early name for longrope
        rope_scaling["rope_type"] = "longrope"
    if rope_scaling["rope_type"] in ("dynamic", "yarn", "longrope"):  # their tables read the checkpoint's own limit
        rope_scaling["config_max_position_embeddings"] = d.get("max_position_embeddings", 2048)
    return None if rope_scaling["rope_type"] == "default" else rope_scaling


def rope_theta_from_hf(d: dict[str, Any], default: float = 10000.0) -> float:
    rope = d.get("rope_parameters") or {}
    return float(d.get("rope_theta", rope.get("rope_theta", default)))


def layer_windows_from_hf(d: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """Per-layer sliding windows: ``layer_types`` (transformers 5) when present, else Qwen2's ``use_sliding_window`` /
    ``max_window_layers`` rule, else ``sliding_window`` on every layer (Mistral)."""
    window = int(d.get("sliding_window") or 0)
    if window <= 0:
        return ()
    types = d.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    if "use_sliding_window" in d:
        if not d["use_sliding_window"]:
            return ()
        first = int(d.get("max_window_layers", 0))
        return tuple(window if i >= first else 0 for i in range(num_layers))
    return (window,) * num_layers


def common_fields(d: dict[str, Any], architecture: str) -> dict[str, Any]:
    """The :class:`ModelConfig` fields read the same way in every family (families override what differs)."""
    num_heads = d["num_attention_heads"]
    hidden = d["hidden_size"]
    num_layers = d["num_hidden_layers"]
    rope_scaling = rope_scaling_from_hf(d)
    max_positions = d.get("max_position_embeddings", 2048)
    if rope_scaling is not None and rope_scaling["rope_type"] == "dynamic":  # dynamic NTK exists to run past it
        max_positions = int(max_positions * rope_scaling["factor"])
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return dict(
        architecture=architecture,
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        intermediate_size=d.get("intermediate_size") or 4 * hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=d.get("num_key_value_heads") or num_heads,
        head_dim=d.get("head_dim") or hidden // num_heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta_from_hf(d),
        rope_scaling=rope_scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=bool(d.get("attention_bias", False)),
        qk_norm=False,
        eos_token_ids=eos_ids,
        bos_token_id=d.get("bos_token_id"),
        torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        sliding_windows=layer_windows_from_hf(d, num_layers),
    )


def is_encoder_config(hf_config: dict[str, Any]) -> bool:
    return any(a in ENCODER_ARCHITECTURES for a in hf_config.get("architectures") or [])


def resolve_task(config: EngineConfig, hf_config: dict[str, Any]) -> str:
    """``generate`` or ``embed`` for this model and ``config.task``: ``auto`` embeds with encoders and generates
    with decoders; a decoder may embed (last-token pooling); an encoder cannot generate (a ValueError)."""
    if is_encoder_config(hf_config):
        if config.task == "generate":
            raise ValueError(f"{hf_config.get('architectures')} is an encoder (embedding) model: it cannot generate "
                             "text. Use task='embed' (--task embed) or 'auto'.")
        return "embed"
    return "embed" if config.task == "embed" else "generate"


def resolve_dtype(requested: str, model_dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: the checkpoint's dtype on GPU (fp32 checkpoints run in bf16), float32 on CPU."""
    if requested != "auto":
        if requested not in _DTYPES:
            raise ValueError(f"Unknown dtype '{requested}'; use auto or one of {', '.join(_DTYPES)}.")
        return _DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    dtype = _DTYPES.get(str(model_dtype).replace("torch.", ""), torch.bfloat16)
    return torch.bfloat16 if dtype == torch.float32 else dtype


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but CUDA is not available.")
    return device


def resolve_max_model_len(requested: int | None, model_limit: int) -> int:
    if requested is None:
        return model_limit
    if requested > model_limit:
        raise ValueError(f"max_model_len={requested} is larger than the model's maximum context of {model_limit}.")
    return requested


def _resolve_backends(config: EngineConfig) -> tuple[str, str]:
    """(attention, kernel) backends: ``auto`` defers to the environment variable, then kernels' own rule (a torch
    kernel backend puts attention on the reference too)."""
    kernel = envs.kernel_backend() if config.kernel_backend == "auto" else config.kernel_backend
    attention = envs.attention_backend() if config.attention_backend == "auto" else config.attention_backend
    return resolve_backends(attention, kernel)


def _resolve_async_scheduling(config: EngineConfig, device: torch.device) -> bool:
    """On with CUDA by default. Off with speculative decoding: a step's drafts come from the previous step's
    accepted tokens, which the host must have before it can schedule."""
    wanted = _wants_async_scheduling(config, device)
    if wanted and config.speculative_config is not None:
        logger.info("async_scheduling is off with speculative decoding (drafts need the previous step's tokens); "
                    "a step stays in flight while the previous step's outputs go out instead.")
        return False
    return wanted


def _resolve_run_ahead(config: EngineConfig, overlap_outputs: bool) -> bool:
    """Only when asked for (on the H200, W6 measured +1% at k = 15 and -6% at k = 5, so it is not the default):
    n-gram speculation on one device with overlap_outputs (async scheduling wanted). Asked for where it cannot
    apply: a startup error that says why."""
    spec = config.speculative_config
    supported = overlap_outputs and spec is not None and spec.method == "ngram" and \
        config.tensor_parallel_size * config.pipeline_parallel_size == 1
    if config.speculative_run_ahead and not supported:
        raise ValueError("speculative_run_ahead needs n-gram speculation (speculative_config method ngram) with "
                         "async scheduling wanted (on by default with CUDA, or async_scheduling=True) on one device "
                         "(no tensor or pipeline parallelism).")
    return supported and config.speculative_run_ahead is True


def _wants_async_scheduling(config: EngineConfig, device: torch.device) -> bool:
    return device.type == "cuda" if config.async_scheduling is None else config.async_scheduling


@dataclass(frozen=True)
class ResolvedConfig:
    """The settings that depend on the model or the device: computed once, read by the runner and the engine."""

    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    max_num_batched_tokens: int
    async_scheduling: bool
    kernel_backend: str  # auto | torch | triton, after $PAGEDSERVE_KERNEL_BACKEND
    attention_backend: str  # auto | torch | triton, after $PAGEDSERVE_ATTENTION_BACKEND (and the kernel backend)
    kv_cache_dtype: torch.dtype  # the KV-cache tensors' element type (resolve_kv_cache_dtype)
    # Speculative decoding, where async scheduling would have been on: each step is scheduled after the previous
    # one's results are applied (as without async scheduling), but ``EngineCore.step`` returns with it still running,
    # so the caller's output handling (detokenising, sending to the API process) overlaps the device.
    overlap_outputs: bool = False
    # N-gram speculation with overlap_outputs: a step without drafts lets the next one be launched before its tokens
    # are read (``EngineCore._step_run_ahead``).
    run_ahead: bool = False

    def summary(self) -> str:
        return (f"device={self.device} dtype={str(self.dtype).removeprefix('torch.')} "
                f"kv_cache_dtype={str(self.kv_cache_dtype).removeprefix('torch.')} "
                f"max_model_len={self.max_model_len} max_num_batched_tokens={self.max_num_batched_tokens} "
                f"async_scheduling={self.async_scheduling} overlap_outputs={self.overlap_outputs} "
                f"run_ahead={self.run_ahead} "
                f"kernel_backend={self.kernel_backend} attention_backend={self.attention_backend}")


def resolve_config(config: EngineConfig, model_config: ModelConfig | BertConfig, device: torch.device | None = None
                   ) -> ResolvedConfig:
    """Every derived engine setting, in one place. ``model_config``: a decoder's ``ModelConfig`` or an encoder's
    ``BertConfig`` (both give ``max_model_len`` and ``torch_dtype``). ``device`` None: resolve ``config.device``."""
    device = resolve_device(config.device) if device is None else device
    max_model_len = resolve_max_model_len(config.max_model_len, model_config.max_model_len)
    attention_backend, kernel_backend = _resolve_backends(config)
    dtype = resolve_dtype(config.dtype, model_config.torch_dtype, device)
    overlap_outputs = config.speculative_config is not None and _wants_async_scheduling(config, device)
    return ResolvedConfig(
        device=device,
        dtype=dtype,
        kv_cache_dtype=resolve_kv_cache_dtype(config.kv_cache_dtype, dtype),
        max_model_len=max_model_len,
        max_num_batched_tokens=config.max_num_batched_tokens or max(8192, max_model_len),
        async_scheduling=_resolve_async_scheduling(config, device),
        overlap_outputs=overlap_outputs,
        run_ahead=_resolve_run_ahead(config, overlap_outputs),
        kernel_backend=kernel_backend,
        attention_backend=attention_backend,
    )


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV-cache tensors' element type: the model dtype for ``auto``, e4m3 for ``fp8`` / ``fp8_e4m3``."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    raise ValueError(f"kv_cache_dtype must be one of auto, fp8, fp8_e4m3; got {kv_cache_dtype!r}.")


def log_resolved(config: EngineConfig, resolved: ResolvedConfig) -> None:
    """One INFO line with the resolved settings, and a note for each vLLM flag accepted without effect."""
    logger.info("Engine config: %s", resolved.summary())
    if config.enable_chunked_prefill is not None:
        logger.info("enable_chunked_prefill=%s: chunked prefill is always on in pagedserve.",
                    config.enable_chunked_prefill)
    if config.trust_remote_code:
        logger.info("trust_remote_code: accepted, no effect: pagedserve never runs remote code.")
