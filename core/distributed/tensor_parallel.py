"""Splitting a Llama-family model (Llama, Mistral, Qwen2, Qwen3) over a tensor-parallel group.

The model is built from a per-rank config (its share of the query heads, KV heads and MLP width; a padded share of
the vocabulary), so every module already has its rank's shapes and the KV cache its rank's heads. Then the layers
that communicate become parallel ones (o/down projections: row-parallel, one all-reduce each; embedding and LM head:
vocabulary-parallel), and the checkpoint's tensors are cut to the rank's slice as they stream in (``shard_weights``).
When there are fewer KV heads than ranks, each KV head is replicated on the ``tp / num_kv_heads`` ranks whose query
heads use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from core.config import ModelConfig
from core.distributed.parallel_state import TensorParallelGroup
from core.layers.parallel_linear import GatheredLogits, RowParallelLinear, VocabParallelEmbedding, vocab_shard_size

# Architectures whose model class is core/models/llama.py's LlamaForCausalLM: the ones tensor parallelism supports.
TP_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def check_layout(cfg: ModelConfig, tp: int, pp: int = 1) -> None:
    """Fail at startup, naming the reason, when the model cannot be split ``tp`` ways and into ``pp`` stages."""
    if cfg.architecture not in TP_ARCHITECTURES:
        raise ValueError(f"tensor_parallel_size={tp}, pipeline_parallel_size={pp}: {cfg.architecture} cannot be "
                         f"split across devices yet; tensor and pipeline parallelism support "
                         f"{', '.join(TP_ARCHITECTURES)}.")
    if cfg.num_layers < pp:
        raise ValueError(f"pipeline_parallel_size={pp} is more stages than the model's {cfg.num_layers} layers.")
    problems = []
    if cfg.num_heads % tp:
        problems.append(f"num_attention_heads={cfg.num_heads} is not divisible by it")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        problems.append(f"num_key_value_heads={cfg.num_kv_heads} neither divides it nor is divisible by it")
    if cfg.intermediate_size % tp:
        problems.append(f"intermediate_size={cfg.intermediate_size} is not divisible by it")
    if problems:
        raise ValueError(f"tensor_parallel_size={tp} does not fit {cfg.architecture}: {'; '.join(problems)}.")


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config of one rank's part: its query heads, KV heads (at least one), MLP width and vocabulary rows."""
    return dataclasses.replace(
        cfg, num_heads=cfg.num_heads // tp, num_kv_heads=max(1, cfg.num_kv_heads // tp),
        intermediate_size=cfg.intermediate_size // tp, vocab_size=vocab_shard_size(cfg.vocab_size, tp))


def parallelize(model: nn.Module, full: ModelConfig, group: TensorParallelGroup) -> nn.Module:
    """Add the collectives to a model built from ``shard_config``: row-parallel o/down projections, the
    vocabulary-parallel embedding (and untied LM head, whose rows ``compute_logits`` reads), gathered logits."""
    for layer in model.model.layers:
        RowParallelLinear.adopt(layer.self_attn.o_proj, group)
        RowParallelLinear.adopt(layer.mlp.down_proj, group)
    VocabParallelEmbedding.adopt(model.model.embed_tokens, group)
    model.compute_logits = GatheredLogits(model.compute_logits, full.vocab_size, group)
    return model


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], full: ModelConfig, rank: int, tp: int
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's (HF name, tensor) pairs cut to rank ``rank``'s slice; replicated tensors pass through."""
    hd = full.head_dim
    q_rows = full.num_heads // tp * hd
    if full.num_kv_heads >= tp:
        kv_rows = full.num_kv_heads // tp * hd
        kv_start = rank * kv_rows
    else:  # the one KV head this rank's query heads attend with
        kv_rows = hd
        kv_start = rank * full.num_kv_heads // tp * hd
    inter = full.intermediate_size // tp
    vocab_rows = vocab_shard_size(full.vocab_size, tp)
    # HF module name -> (dim to cut, first index, length)
    rules = {
        "q_proj": (0, rank * q_rows, q_rows),
        "k_proj": (0, kv_start, kv_rows),
        "v_proj": (0, kv_start, kv_rows),
        "o_proj": (1, rank * q_rows, q_rows),
        "gate_proj": (0, rank * inter, inter),
        "up_proj": (0, rank * inter, inter),
        "down_proj": (1, rank * inter, inter),
    }
    for name, tensor in weights:
        parts = name.split(".")
        module = parts[-2] if len(parts) >= 2 else ""
        if module in rules:
            dim, start, length = rules[module]
            if tensor.dim() == 1 and dim == 1:  # a row-parallel bias (RowParallelLinear refuses it at build time)
                yield name, tensor
                continue
            yield name, tensor.narrow(dim, start, length)
        elif module in ("embed_tokens", "lm_head"):
            yield name, _vocab_rows(tensor, rank * vocab_rows, vocab_rows)
        else:
            yield name, tensor


def _vocab_rows(tensor: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows ``start .. start + rows`` of a ``[vocab, hidden]`` tensor, zero-padded past the vocabulary's end."""
    part = tensor[start : start + rows]
    if part.shape[0] == rows:
        return part
    out = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype)
    out[: part.shape[0]] = part
    return out
