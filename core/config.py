"""Model configuration (the few HF config fields our Llama-family implementation reads) and the engine settings
derived from ``EngineConfig`` + the model + the device, resolved once (``resolve_config``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from core import envs
from kernels.backend import resolve_backends
from ipc.config import DTYPE_NAMES, EngineConfig

logger = logging.getLogger(__name__)

# HF architecture name -> how its attention differs from plain Llama.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# Every dtype spelling ``EngineConfig.dtype`` accepts (one table: ``ipc/config.py``), as a torch dtype.
_DTYPES = {name: getattr(torch, canonical) for name, canonical in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class ModelConfig:
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
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"Unsupported model architecture {archs or d.get('model_type')}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}."
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        num_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        rope = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = d.get("rope_scaling")
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_scaling.setdefault("rope_type", rope_scaling.get("type", "default"))
            if rope_scaling["rope_type"] == "default":
                rope_scaling = None
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or hidden // num_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=bool(d.get("attention_bias", False)) or family == "qwen2",
            qk_norm=family == "qwen3",
            eos_token_ids=eos_ids,
            bos_token_id=d.get("bos_token_id"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        )


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
    wanted = device.type == "cuda" if config.async_scheduling is None else config.async_scheduling
    if wanted and config.speculative_config is not None:
        logger.info("async_scheduling is off with speculative decoding (drafts need the previous step's tokens).")
        return False
    return wanted


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

    def summary(self) -> str:
        return (f"device={self.device} dtype={str(self.dtype).removeprefix('torch.')} "
                f"max_model_len={self.max_model_len} max_num_batched_tokens={self.max_num_batched_tokens} "
                f"async_scheduling={self.async_scheduling} kernel_backend={self.kernel_backend} "
                f"attention_backend={self.attention_backend}")


def resolve_config(config: EngineConfig, model_config: ModelConfig, device: torch.device | None = None
                   ) -> ResolvedConfig:
    """Every derived engine setting, in one place. ``device`` None: resolve ``config.device``."""
    device = resolve_device(config.device) if device is None else device
    max_model_len = resolve_max_model_len(config.max_model_len, model_config.max_position_embeddings)
    attention_backend, kernel_backend = _resolve_backends(config)
    return ResolvedConfig(
        device=device,
        dtype=resolve_dtype(config.dtype, model_config.torch_dtype, device),
        max_model_len=max_model_len,
        max_num_batched_tokens=config.max_num_batched_tokens or max(8192, max_model_len),
        async_scheduling=_resolve_async_scheduling(config, device),
        kernel_backend=kernel_backend,
        attention_backend=attention_backend,
    )


def log_resolved(config: EngineConfig, resolved: ResolvedConfig) -> None:
    """One INFO line with the resolved settings, and a note for each vLLM flag accepted without effect."""
    logger.info("Engine config: %s", resolved.summary())
    if config.enable_chunked_prefill is not None:
        logger.info("enable_chunked_prefill=%s: chunked prefill is always on in pagedserve.",
                    config.enable_chunked_prefill)
    if config.trust_remote_code:
        logger.info("trust_remote_code: accepted, no effect: pagedserve never runs remote code.")
