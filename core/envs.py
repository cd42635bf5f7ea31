"""Every environment variable pagedserve reads, in one place: its name, what it means, its default.

Read lazily (each call reads ``os.environ`` now), never at import, so a test's ``monkeypatch.setenv`` or a
launcher's ``env`` always takes effect. Import-light (no torch): both processes and the CLI import it.
Nothing else in the tree reads ``os.environ`` for a setting; add a variable here, with its line in ``ENV_VARS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EnvVar:
    name: str
    meaning: str
    default: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("PAGEDSERVE_LOG_LEVEL", "Log level of both processes (DEBUG, INFO, WARNING, ...).", "INFO"),
    EnvVar("PAGEDSERVE_CACHE_DIR", "Where converted GGUF tokenizers and extracted packaged models "
           "(all-MiniLM-L6-v2) are cached.",
           "$XDG_CACHE_HOME/pagedserve, else ~/.cache/pagedserve"),
    EnvVar("PAGEDSERVE_API_KEY", "Default of `serve --api-key` (Bearer token required on every API route).",
           "unset: no auth"),
    EnvVar("VLLM_API_KEY", "Read when PAGEDSERVE_API_KEY is unset, so vLLM deployments keep their key.", "unset"),
    EnvVar("PAGEDSERVE_KERNEL_BACKEND", "What `kernel_backend=auto` means: torch forces every kernel onto its "
           "torch reference; triton or unset: Triton on CUDA.", "unset (auto)"),
    EnvVar("PAGEDSERVE_ATTENTION_BACKEND", "What `attention_backend=auto` means: torch forces attention onto "
           "its torch reference; triton or unset: Triton on CUDA.", "unset (auto)"),
    EnvVar("HF_HUB_OFFLINE", "Hugging Face's: 1 never contacts the hub when resolving a model id.", "unset"),
    EnvVar("TRANSFORMERS_OFFLINE", "Same as HF_HUB_OFFLINE (transformers' older spelling).", "unset"),
    EnvVar("PAGEDSERVE_BATCH_DETOKENIZE", "1: the API process decodes every advancing stream's text in one "
           "tokenizer call per step (decode_batch, on rayon's threads); unset or 0: one call per stream, which "
           "measured faster on a busy 2-core machine (to be compared on the GPU host).", "0"),
    EnvVar("PAGEDSERVE_GC_GEN0_THRESHOLD", "The cyclic collector's young-generation threshold in the engine core "
           "and API processes once started (after they freeze their startup heap); 0 keeps CPython's default "
           "(700). See core/gc_tuning.py.", "20000"),
    EnvVar("PROMETHEUS_MULTIPROC_DIR", "prometheus_client's: set by the --api-server-count launcher for its API "
           "processes (metrics summed over them); not meant to be set by hand.", "unset"),
    EnvVar("OMP_NUM_THREADS", "When set, the CPU engine process keeps torch's thread count; unset, it uses "
           "all cores but one (the API process needs one).", "unset"),
    EnvVar("PAGEDSERVE_TEST_STEP_FAULT_TOKENS", "Tests only: comma-separated token ids; an engine step that "
           "schedules a sequence whose prompt contains this run raises (exercises step-failure recovery: that "
           "request fails with a 500, the engine keeps serving). Never set it in production.", "unset"),
)

_TRUE = ("1", "ON", "YES", "TRUE")
BACKENDS = ("auto", "torch", "triton")


def _get(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def log_level() -> str:
    return (_get("PAGEDSERVE_LOG_LEVEL") or "INFO").upper()


def cache_dir() -> Path:
    base = _get("PAGEDSERVE_CACHE_DIR")
    if base:
        return Path(base)
    xdg = _get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pagedserve"


def api_key() -> str | None:
    return _get("PAGEDSERVE_API_KEY") or _get("VLLM_API_KEY")


def _backend(name: str) -> str:
    value = (_get(name) or "auto").lower()
    if value not in BACKENDS:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(BACKENDS)}.")
    return value


def kernel_backend() -> str:
    return _backend("PAGEDSERVE_KERNEL_BACKEND")


def attention_backend() -> str:
    return _backend("PAGEDSERVE_ATTENTION_BACKEND")


def hf_hub_offline() -> bool:
    return any((_get(name) or "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def omp_num_threads_set() -> bool:
    return "OMP_NUM_THREADS" in os.environ


def step_fault_tokens() -> list[int]:
    value = _get("PAGEDSERVE_TEST_STEP_FAULT_TOKENS")
    if not value:
        return []
    try:
        return [int(t) for t in value.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"PAGEDSERVE_TEST_STEP_FAULT_TOKENS is {value!r}: use comma-separated token ids.") from None


def batch_detokenize() -> bool:
    return (_get("PAGEDSERVE_BATCH_DETOKENIZE") or "").upper() in _TRUE


def gc_gen0_threshold(default: int) -> int:
    value = _get("PAGEDSERVE_GC_GEN0_THRESHOLD")
    if not value:
        return default
    try:
        threshold = int(value)
    except ValueError:
        raise ValueError(f"PAGEDSERVE_GC_GEN0_THRESHOLD must be a whole number, not {value!r}") from None
    if threshold < 0:
        raise ValueError(f"PAGEDSERVE_GC_GEN0_THRESHOLD must be >= 0 (0: CPython's default), not {threshold}")
    return threshold


def prometheus_multiproc_dir() -> str | None:
    return _get("PROMETHEUS_MULTIPROC_DIR") or None


def set_prometheus_multiproc_dir(path: str) -> None:
    """The --api-server-count launcher's: its spawned API processes inherit it (prometheus_client reads it at
    import)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
