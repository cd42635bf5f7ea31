"""Pooling: per-token hidden states of a packed batch -> one embedding per sequence.

How to pool comes from the checkpoint's sentence-transformers files (``modules.json`` lists a ``Pooling`` module with
its ``config.json``, and a ``Normalize`` module when embeddings are L2-normalised); decoder models used as embedders
(``task="embed"`` on a Llama/Qwen checkpoint without those files) pool their last token and normalise, as vLLM does.
"""

from __future__ import annotations

import json
import enum
from dataclasses import dataclass
from pathlib import Path

import torch


class PoolingType(enum.Enum):
    MEAN = "mean"
    CLS = "cls"
    LAST = "last"


@dataclass(frozen=True)
class PoolingConfig:
    pooling_type: PoolingType
    normalize: bool


_UNSUPPORTED_MODES = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


def load_pooling_config(model_dir: str | Path | None, default: PoolingConfig) -> PoolingConfig:
    """The sentence-transformers pooling of ``model_dir``, or ``default`` when it has no ``modules.json``.

    A pooling mode we do not implement (max, mean-sqrt-len, weighted mean, or several at once) is a startup error
    that names it, never a silent substitute."""
    if model_dir is None:
        return default
    directory = Path(model_dir)
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return default
    modules = json.loads(modules_path.read_text())
    pooling_type = default.pooling_type
    normalize = False
    found_pooling = False
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            found_pooling = True
            pooling_type = _pooling_type_from(directory / module.get("path", "") / "config.json")
    if not found_pooling:
        return PoolingConfig(default.pooling_type, normalize or default.normalize)
    return PoolingConfig(pooling_type, normalize)


def _pooling_type_from(config_path: Path) -> PoolingType:
    cfg = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if "pooling_mode" in cfg:  # newer sentence-transformers spell it as one string
        mode = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                "lasttoken": "pooling_mode_lasttoken"}.get(cfg["pooling_mode"], cfg["pooling_mode"])
        cfg = {mode: True}
    chosen = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    unsupported = [k for k in chosen if k in _UNSUPPORTED_MODES]
    if unsupported or len(chosen) != 1:
        raise ValueError(f"Unsupported sentence-transformers pooling in {config_path}: {chosen or 'none'}; "
                         "supported: exactly one of pooling_mode_mean_tokens, pooling_mode_cls_token, "
                         "pooling_mode_lasttoken.")
    return {"pooling_mode_mean_tokens": PoolingType.MEAN, "pooling_mode_cls_token": PoolingType.CLS,
            "pooling_mode_lasttoken": PoolingType.LAST}[chosen[0]]


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, config: PoolingConfig) -> torch.Tensor:
    """hidden: [T, H] for sequences packed back to back; cu_seqlens: [B + 1] (int, on hidden's device).
    Returns [B, H] float32: mean / first / last token per sequence, L2-normalised when the config says so."""
    starts = cu_seqlens[:-1].long()
    ends = cu_seqlens[1:].long()
    if config.pooling_type is PoolingType.CLS:
        pooled = hidden[starts].float()
    elif config.pooling_type is PoolingType.LAST:
        pooled = hidden[ends - 1].float()
    else:
        lens = ends - starts
        seq_of_token = torch.repeat_interleave(torch.arange(len(lens), device=hidden.device), lens,
                                               output_size=hidden.shape[0])
        sums = torch.zeros(len(lens), hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, seq_of_token, hidden.float())
        pooled = sums / lens[:, None].float()
    if config.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled
