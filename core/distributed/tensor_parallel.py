"""Splitting a Llama-family model (Llama, Mistral, Qwen2, Qwen3) or a mixture of experts on its attention (Mixtral,
Qwen2-MoE, Qwen3-MoE) over a tensor-parallel group.

The model is built from a per-rank config (its share of the query heads, KV heads and MLP width; a padded share of
the vocabulary), so every module already has its rank's shapes and the KV cache its rank's heads. Then the layers
that communicate become parallel ones (o/down projections: row-parallel, one all-reduce each; embedding and LM head:
vocabulary-parallel), and the checkpoint's tensors are cut to the rank's slice as they stream in (``shard_weights``).
When there are fewer KV heads than ranks, each KV head is replicated on the ``tp / num_kv_heads`` ranks whose query
heads use it. A sparse MoE block keeps every expert on every rank with its slice of the expert's intermediate
dimension (core/layers/parallel_moe.py): one all-reduce after the block, the router replicated. A quantized
layer's tensors (packed codes, scales, group indices, GGUF blocks) are cut by its quantization method
(``QuantConfig.shard_tensor``), which knows their layouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from core.config import ModelConfig
from core.distributed.parallel_state import TensorParallelGroup
from core.layers.moe import SparseMoeBlock
from core.layers.parallel_linear import GatheredLogits, RowParallelLinear, VocabParallelEmbedding, vocab_shard_size
from core.layers.parallel_moe import ParallelSparseMoeBlock
from core.layers.quantization.base import plain_shard
from core.models.mixtral import MoeConfig

# The layers that hold a slice of their input features (one all-reduce after each); the rest of a layer's projections
# hold a slice of their output features.
ROW_PARALLEL_MODULES = ("o_proj", "down_proj")

# Architectures whose model class is core/models/llama.py's LlamaForCausalLM or its MoE subclass in
# core/models/mixtral.py: the ones tensor parallelism supports.
TP_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                    "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


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
    if quantized_lm_head(cfg) and cfg.vocab_size % tp:
        problems.append(f"the checkpoint's quantized lm_head has vocab_size={cfg.vocab_size} rows, not divisible by it "
                        "(a 16-bit head's last rank is padded with zero rows; a quantized one's packed rows are not)")
    has_dense_mlp = not isinstance(cfg, MoeConfig) or not all(cfg.sparse_layers)
    if has_dense_mlp and cfg.intermediate_size % tp:
        problems.append(f"intermediate_size={cfg.intermediate_size} is not divisible by it")
    if isinstance(cfg, MoeConfig):
        if cfg.moe_intermediate_size % tp:
            problems.append(f"moe_intermediate_size={cfg.moe_intermediate_size} is not divisible by it")
        if cfg.shared_expert_intermediate_size % tp:
            problems.append(f"shared_expert_intermediate_size={cfg.shared_expert_intermediate_size} is not "
                            "divisible by it")
    if problems:
        raise ValueError(f"tensor_parallel_size={tp} does not fit {cfg.architecture}: {'; '.join(problems)}.")


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config of one rank's part: its query heads, KV heads (at least one), MLP width (each expert's and the
    shared expert's too) and vocabulary rows."""
    moe = {}
    if isinstance(cfg, MoeConfig):
        moe = dict(moe_intermediate_size=cfg.moe_intermediate_size // tp,
                   shared_expert_intermediate_size=cfg.shared_expert_intermediate_size // tp)
    quant = cfg.quantization and cfg.quantization.for_tensor_parallel(tp, ROW_PARALLEL_MODULES)
    return dataclasses.replace(
        cfg, num_heads=cfg.num_heads // tp, num_kv_heads=max(1, cfg.num_kv_heads // tp),
        intermediate_size=cfg.intermediate_size // tp, vocab_size=vocab_shard_size(cfg.vocab_size, tp),
        quantization=quant, **moe)


def parallelize(model: nn.Module, full: ModelConfig, group: TensorParallelGroup) -> nn.Module:
    """Add the collectives to a model built from ``shard_config``: row-parallel o/down projections (an all-reduce
    after each sparse MoE block instead), the vocabulary-parallel embedding (and untied LM head, whose rows
    ``compute_logits`` reads), gathered logits."""
    for layer in model.model.layers:
        RowParallelLinear.adopt(layer.self_attn.o_proj, group)
        if isinstance(layer.mlp, SparseMoeBlock):
            ParallelSparseMoeBlock.adopt(layer.mlp, group)
        else:
            RowParallelLinear.adopt(layer.mlp.down_proj, group)
    VocabParallelEmbedding.adopt(model.model.embed_tokens, group)
    model.compute_logits = GatheredLogits(model.compute_logits, full.vocab_size, group)
    return model


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], full: ModelConfig, rank: int, tp: int
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's (HF name, tensor) pairs cut to rank ``rank``'s slice; replicated tensors pass through. A
    quantized layer's tensors (packed codes, scales, group indices) are cut by its method (``shard_tensor``), in
    units of the layer's features."""
    if tp == 1:  # pipeline stages only: every tensor whole
        yield from weights
        return
    quant = full.quantization

    def cut(name: str, tensor: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
        parallel = "column" if dim == 0 else "row"
        if quant is None:
            return plain_shard(tensor, parallel, start, length)
        return quant.shard_tensor(name, tensor, parallel, start, length)

    hd = full.head_dim
    q_rows = full.num_heads // tp * hd
    if full.num_kv_heads >= tp:
        kv_rows = full.num_kv_heads // tp * hd
        kv_start = rank * kv_rows
    else:  # the one KV head this rank's query heads attend with
        kv_rows = hd
        kv_start = rank * full.num_kv_heads // tp * hd
    vocab_rows = vocab_shard_size(full.vocab_size, tp)
    # HF module name -> (dim to cut, first index, length)
    rules = {
        "q_proj": (0, rank * q_rows, q_rows),
        "k_proj": (0, kv_start, kv_rows),
        "v_proj": (0, kv_start, kv_rows),
        "o_proj": (1, rank * q_rows, q_rows),
    }
    for name, tensor in weights:
        parts = name.split(".")
        module = parts[-2] if len(parts) >= 2 else ""
        if name.endswith((_FUSED_GATE_UP, _FUSED_DOWN)):
            yield name, _fused_expert_slice(name, tensor, rank, tp)
        elif module in _MLP_DIM or (module in _EXPERT_DIM and ".experts." in name):
            dim = _MLP_DIM.get(module, _EXPERT_DIM.get(module))
            inter = _mlp_width(name, full) // tp
            yield name, cut(name, tensor, dim, rank * inter, inter)
        elif module in rules:
            yield name, cut(name, tensor, *rules[module])
        elif module == "lm_head" and quantized_lm_head(full):  # the rank's rows: whole vocab_rows (check_layout)
            yield name, cut(name, tensor, 0, rank * vocab_rows, vocab_rows)
        elif module in ("embed_tokens", "lm_head"):
            yield name, _vocab_rows(tensor, rank * vocab_rows, vocab_rows)
        else:
            yield name, tensor


def quantized_lm_head(cfg: ModelConfig) -> bool:
    """Whether the model's untied LM head is a quantized checkpoint layer (GPTQ's ``lm_head: true``, ...), whose
    tensors the method cuts as a column-parallel layer's; GGUF's head kept in blocks is cut by vocabulary rows."""
    return (not cfg.tie_word_embeddings and cfg.quantization is not None
            and getattr(cfg.quantization, "quantized_lm_head", False))


def _vocab_rows(tensor: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows ``start .. start + rows`` of a ``[vocab, hidden]`` tensor, zero-padded past the vocabulary's end."""
    part = tensor[start : start + rows]
    if part.shape[0] == rows:
        return part
    out = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype)
    out[: part.shape[0]] = part
    return out


# Gated-MLP projections -> the dim cut: the intermediate one (rows of gate/up, columns of down). HF's names for the
# dense MLP, Qwen's experts and shared expert; Mixtral's expert names (only under ``.experts.``).
_MLP_DIM = {"gate_proj": 0, "up_proj": 0, "down_proj": 1}
_EXPERT_DIM = {"w1": 0, "w3": 0, "w2": 1}
# transformers 5's fused expert tensors (under ``.mlp.`` or Mixtral's ``.block_sparse_moe.``): ``[E, 2I, H]`` and
# ``[E, H, I]``
_FUSED_GATE_UP = ".experts.gate_up_proj"
_FUSED_DOWN = ".experts.down_proj"


def _mlp_width(name: str, full: ModelConfig) -> int:
    """The full intermediate width of the gated MLP a projection belongs to: an expert's, the shared expert's or the
    dense MLP's."""
    if isinstance(full, MoeConfig):
        if ".experts." in name:
            return full.moe_intermediate_size
        if ".shared_expert." in name:
            return full.shared_expert_intermediate_size
    return full.intermediate_size


def _fused_expert_slice(name: str, tensor: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """The rank's slice of every expert in a fused tensor: its rows of gate and of up, or its columns of down."""
    if name.endswith(_FUSED_DOWN):
        inter = tensor.shape[2] // tp
        return tensor.narrow(2, rank * inter, inter)
    full_inter = tensor.shape[1] // 2
    inter = full_inter // tp
    return torch.cat([tensor.narrow(1, rank * inter, inter), tensor.narrow(1, full_inter + rank * inter, inter)], 1)
