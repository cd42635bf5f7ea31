"""GGUF weights kept in their GGML blocks on the device, dequantized inside the GEMM (``kernels/gguf_gemm.py``).

Which tensors stay quantized is decided once from the file's header (``GGUFConfig.from_file``), and the same
decision drives both sides: the loader yields those tensors as their raw ``uint8 [rows, row_bytes]`` blocks
(``core/gguf.py``), the model gives their layers a ``GGUFLinearMethod`` / ``GGUFEmbedding`` holding exactly those
bytes. Kept: linear, token-embedding and LM-head weights of the kernel's types (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K),
and linear and expert weights of IQ4_NL / IQ4_XS, which are repacked at load on every device for the 4-bit codebook
kernels (``kernels/gguf_codebook.py``: llama.cpp's ``kvalues_iq4nl`` as the codebook, exact); a merged projection
(q/k/v, gate/up) only if all its parts share one type, a MoE block's IQ4 stacks only if all three are. Everything else
(F32/F16/BF16 tensors, other quant types, mixed-type merges) is dequantized at load as before, and logged.

Q4_0, Q4_1 and Q4_K linear weights are 4-bit codes with one scale and one offset per 32 inputs (a Q4_0 / Q4_1
block, a Q4_K sub-block: ``d * sc * q - dmin * m``), which is the w4a16 int4 form with group size 32: after loading
they are repacked once into the int4 kernels' layout (``kernels/gguf_gemm.py: q4_blocks_as_int4``,
``kernels/int4_gemm.py``; the same bytes for Q4_1, 11% more for Q4_0 and Q4_K), so they run on the int4 decode and
prefill kernels instead of the block GEMM (H200: 1.8-2x bf16's time at M = 1, 7-8x at M = 4, more for larger
batches). Up to 16 rows that is the tensor-core decode kernel: Q4_0's zero point 8 inside the weight, Q4_1's
``-m / d`` and Q4_K's ``dmin * m / (d * sc)`` (not whole numbers) with their fractional part apart (its ``mma``
kind's ``FRACTIONAL_ZEROS``); tl.dot past it. A layer whose blocks do not fit that form (see
``q4_blocks_as_int4``) keeps its blocks. Mixture-of-experts stacks of those types likewise run on the int4 experts'
kernel (``GGUFMoEMethod``), and Q8_0 / Q6_K / Q5_K stacks the 8-bit experts' kernel (``blocks_as_int8``: int8 codes,
fp32 scales per 32 / 16 inputs and Q5_K's offsets, exact); each stack on its own (a Q4_K_M file's Q4_K gate / up as
int4 beside its Q6_K down as int8). The other types, the embedding and the LM head stay in their blocks, and so
does everything on CPU (there both paths dequantize in torch).

When: ``--quantization gguf``. Without it a GGUF file is dequantized at load, as before (kept quantized it saves
memory, not time: on CPU there is no kernel and every weight is dequantized per step in torch). ``--gguf-dequantize``
names the dequantized path explicitly.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from gguf import GGMLQuantizationType
from torch import nn

from core.layers.quantization.base import LinearMethod, QuantConfig, new_parameter, plain_shard, replace_parameter
from core.layers.quantization.bnb import codebook_linear
from kernels.fused_moe import ExpertQuant
from kernels.gguf_codebook import CODEBOOK_BLOCK, CODEBOOK_TYPES, IQ4_CODEBOOK, iq4_blocks_as_codebook
from kernels.gguf_gemm import (GGUF_KERNEL_TYPES, INT4_TYPES, INT8_GROUPS, INT8_TYPES, Q4_0, Q6_K, Q8_0, blocks_as_int8,
                               dequantize_gguf, gguf_linear, q4_blocks_as_int4)  # fmt: skip
from kernels.int4_gemm import int4_linear, pack_int4_kernel

if TYPE_CHECKING:
    from core.config import ModelConfig
    from core.model_source import ModelSource
    from ipc.config import EngineConfig

logger = logging.getLogger(__name__)

# Merged projections: HF suffix of the first shard -> every shard's suffix (core/models/llama.py merges these).
_MERGES = {"self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
           # a MoE layer's stacked experts (core/gguf.py: expert_stack_name), run by one fused kernel: all or none
           "mlp.experts.gate_proj": ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")}
# A merged projection's first shard -> the one tensor some files hold it in (Phi-3's qkv and gate_up)
_FUSED = {"self_attn.q_proj": "self_attn.qkv_proj", "mlp.gate_proj": "mlp.gate_up_proj"}
_KEPT_KINDS = re.compile(r"(model\.layers\.\d+\.(self_attn\.([qkvo]|qkv)_proj"
                         r"|mlp\.(experts\.)?(gate|up|down|gate_up)_proj|mlp\.c_(fc|proj))"
                         r"|model\.embed_tokens|lm_head"
                         # Falcon's, GPT-NeoX's and GPT-2's linear layers (their embeddings and heads dequantize)
                         r"|transformer\.h\.\d+\.(self_attention\.(query_key_value|dense)|attn\.c_(attn|proj)"
                         r"|mlp\.(dense_h_to_4h|dense_4h_to_h|c_fc|c_proj))"
                         r"|gpt_neox\.layers\.\d+\.(attention\.(query_key_value|dense)|mlp\.dense_(h_to_4h|4h_to_h)))"
                         r"\.weight")
# Families whose LM head is a plain Linear of their own (no GGUFEmbedding for it): theirs is dequantized at load
_OWN_HEADS = ("falcon", "gptneox", "gpt2")
EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
# an expert stack's form: the file's, or repacked (``repack_experts``)
BLOCKS, INT4, INT8, CODEBOOK = "blocks", "int4", "int8", "codebook"
# Every type kept quantized -> (elements per block, bytes per block): the block GEMM's, and IQ4_NL / IQ4_XS, which are
# always repacked for the 4-bit codebook kernels (linear layers and experts; their embedding / LM head dequantize)
KEPT_TYPES = GGUF_KERNEL_TYPES | CODEBOOK_TYPES


def _type_name(ggml_type: int) -> str:
    return GGMLQuantizationType(ggml_type).name


def _row_bytes(ggml_type: int, in_features: int, input_shards: int = 1) -> int:
    block, type_size = KEPT_TYPES[ggml_type]
    if in_features % block:
        split = ""
        if input_shards > 1:
            split = (f" (this rank's share of {in_features * input_shards}; use fewer ranks, or dequantize the file "
                     "at load: leave out --quantization gguf)")
        raise ValueError(f"GGUF {_type_name(ggml_type)}: input size {in_features}{split} is not a multiple of its "
                         f"{block}-element blocks.")
    return in_features // block * type_size


class GGUFConfig(QuantConfig):
    """The tensors of one GGUF file kept in their blocks: HF weight name -> GGML type."""

    name = "gguf"

    def __init__(self, path: str, kept: dict[str, int], widths: dict[str, int] | None = None) -> None:
        """``kept``: HF weight name -> GGML type of the tensors kept in blocks; ``widths``: their input features
        (a row's elements), to tell which a tensor-parallel rank's share would cut (:meth:`for_tensor_parallel`)."""
        self.path = path
        self.kept = kept
        self.widths = widths or {}

    @classmethod
    def from_hf(cls, quantization_config: dict[str, Any]) -> GGUFConfig:
        raise ValueError("quantization 'gguf' applies to .gguf model files, not to a config.json checkpoint.")

    @classmethod
    def online(cls) -> QuantConfig:
        raise ValueError("--quantization gguf needs a .gguf model file (its weights keep their GGML blocks); this "
                         "checkpoint is not a GGUF file.")

    @classmethod
    def from_file(cls, path: str) -> GGUFConfig:
        """Decide (and log) which tensors of the file stay quantized; the rest are dequantized at load."""
        from core.gguf import gguf_hf_name
        from core.loader import open_gguf

        gguf = open_gguf(path)
        types: dict[str, int] = {}
        widths: dict[str, int] = {}
        for name, info in gguf.tensors.items():
            try:
                hf_name = gguf_hf_name(gguf, name)
            except ValueError:
                continue  # rope_freqs and the like: the loader handles (or rejects) them
            types[hf_name], widths[hf_name] = int(info.ggml_type), int(info.shape[-1])
        own_head = str(gguf.metadata.get("general.architecture")) in _OWN_HEADS
        kept = {name: t for name, t in types.items() if _KEPT_KINDS.fullmatch(name)
                and (t in GGUF_KERNEL_TYPES or (t in CODEBOOK_TYPES and name not in (EMBEDDING, LM_HEAD)))
                and not (own_head and name == LM_HEAD)}
        dequantized: dict[str, list[str]] = {}
        for name, t in types.items():
            if name not in kept and t not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                dequantized.setdefault(f"{_type_name(t)} (no kernel for this type or tensor)", []).append(name)
        for name in list(kept):
            for first, parts in _MERGES.items():
                if name.endswith(f".{first}.weight"):
                    names = [name.replace(f".{first}.", f".{part}.") for part in parts]
                    # one type for a merged projection's parts; the experts' down may differ from gate / up
                    same_type = names[:2] if first == "mlp.experts.gate_proj" else names
                    part_types = {types.get(n) for n in same_type}
                    # a block's experts run one kernel kind for IQ4 stacks: the codebook experts, all or none
                    codebook_mix = len({types.get(n) in CODEBOOK_TYPES for n in names}) > 1
                    if len(part_types) > 1 or not all(n in kept for n in names) or codebook_mix:
                        reason = "merged projection of mixed types " + "/".join(
                            _type_name(types[n]) for n in names if n in types)
                        for n in names:
                            if kept.pop(n, None) is not None:
                                dequantized.setdefault(reason, []).append(n)
        for reason, names in dequantized.items():
            logger.info("GGUF: %d tensors dequantized at load: %s (e.g. %s)", len(names), reason, names[0])
        counts: dict[str, int] = {}
        for t in kept.values():
            counts[_type_name(t)] = counts.get(_type_name(t), 0) + 1
        logger.info("GGUF: %d tensors kept in their blocks (%s)", len(kept),
                    ", ".join(f"{n} {c}" for n, c in sorted(counts.items())))
        return cls(path, kept, {name: widths[name] for name in kept})

    def for_tensor_parallel(self, tp: int, row_parallel_modules: Sequence[str]) -> GGUFConfig:
        """This config for one of ``tp`` ranks: a row-parallel layer whose rank's share of inputs would cut its
        GGML blocks is dequantized at load instead (logged; an expert stack with its gate and up, which one fused
        kernel runs with it), so every rank holds whole blocks or float weights."""
        part = super().for_tensor_parallel(tp, row_parallel_modules)
        cut = [name for name, t in self.kept.items() if name.rsplit(".", 2)[-2] in row_parallel_modules
               and name in self.widths and (self.widths[name] // tp) % KEPT_TYPES[t][0]]
        for name in list(cut):
            if ".experts.down_proj." in name:
                cut += [name.replace(".down_proj.", proj) for proj in (".gate_proj.", ".up_proj.")]
        if cut:
            logger.info("GGUF: %d tensors dequantized at load under tensor_parallel_size=%d: a rank's share of their "
                        "inputs would cut their blocks (e.g. %s)", len(cut), tp, cut[0])
            part.kept = {name: t for name, t in self.kept.items() if name not in cut}
        return part

    def linear_method(self, prefix: str) -> LinearMethod | None:
        name = self.global_prefix(prefix)
        ggml_type = self.kept.get(f"{name}.weight")
        for first, fused in _FUSED.items():  # a file whose merged projection is one tensor (Phi-3)
            if ggml_type is None and name.endswith(f".{first}"):
                ggml_type = self.kept.get(f"{name.removesuffix(first)}{fused}.weight")
        return None if ggml_type is None else GGUFLinearMethod(ggml_type, self.input_shards(prefix))

    def moe_method(self, prefix: str) -> GGUFMoEMethod | None:
        """The MoE block ``prefix``'s experts kept in their blocks (gate and up of one type, down of any), or None
        (dequantized at load)."""
        name = self.global_prefix(prefix)
        gate = self.kept.get(f"{name}.experts.gate_proj.weight")
        down = self.kept.get(f"{name}.experts.down_proj.weight")
        if gate is None or down is None:
            return None
        return GGUFMoEMethod(gate, down, self.tp_size)  # under tensor parallelism down's inputs are split

    def shard_tensor(self, name: str, tensor: torch.Tensor, parallel: str, start: int, length: int) -> torch.Tensor:
        """A kept weight's ``[out, row_bytes]`` blocks (an expert stack's ``[E, out, row_bytes]``: every expert's):
        output rows, or whole blocks of input features."""
        ggml_type = self.kept.get(name)
        if ggml_type is None or tensor.dtype != torch.uint8:  # dequantized at load (here, or by a rank's config)
            return plain_shard(tensor, parallel, start, length)
        rows = tensor.dim() - 2  # the output-row dim: 1 for an expert stack
        if parallel == "column":
            return tensor.narrow(rows, start, length)
        block, type_size = KEPT_TYPES[ggml_type]
        if start % block or length % block:
            raise ValueError(f"GGUF {_type_name(ggml_type)}: {name} cannot be split over the ranks: each rank's "
                             f"{length} input features (from {start}) are not whole {block}-element blocks; use "
                             "fewer ranks, or dequantize the file at load (leave out --quantization gguf).")
        return tensor.narrow(rows + 1, start // block * type_size, length // block * type_size)

    def embedding(self, num_embeddings: int, embedding_dim: int, backend: str) -> nn.Module | None:
        """The token embedding kept in its blocks, or None (dequantized at load: a plain ``Embedding``)."""
        ggml_type = self.kept.get(EMBEDDING)
        return None if ggml_type is None else GGUFEmbedding(num_embeddings, embedding_dim, ggml_type, backend)

    def lm_head(self, hidden_size: int, vocab_size: int, backend: str) -> nn.Module | None:
        """An untied LM head kept in its blocks, or None."""
        ggml_type = self.kept.get(LM_HEAD)
        return None if ggml_type is None else GGUFEmbedding(vocab_size, hidden_size, ggml_type, backend)

    def summary(self) -> str:
        return f"gguf ({len(self.kept)} tensors kept in their GGML blocks)"


class GGUFLinearMethod(LinearMethod):
    """The layer's ``weight`` is the file's bytes, ``uint8 [out, row_bytes]``: merged shards fill their rows. Q4_0 /
    Q4_1 / Q4_K layers are then repacked for the int4 kernels (module docstring)."""

    INT4_GROUP = 32  # one Q4_0 / Q4_1 block, one Q4_K sub-block

    def __init__(self, ggml_type: int, input_shards: int = 1) -> None:
        self.ggml_type = ggml_type
        self.input_shards = input_shards  # tensor-parallel ranks sharing the layer's input features

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:  # fmt: skip
        row_bytes = _row_bytes(self.ggml_type, in_features, self.input_shards)
        new_parameter(layer, "weight", (sum(output_sizes), row_bytes), torch.uint8,
                      dummy_fill=_random_blocks(self.ggml_type))
        layer.ggml_type = self.ggml_type
        layer.in_features, layer.params_dtype = in_features, params_dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.ggml_type in CODEBOOK_TYPES:  # on every device: the block GEMM has no IQ4 decode
            codes, absmax = iq4_blocks_as_codebook(layer.weight.data, self.ggml_type, layer.in_features)
            replace_parameter(layer, "weight", codes)
            replace_parameter(layer, "weight_absmax", absmax)
            replace_parameter(layer, "weight_quant_map", torch.tensor(IQ4_CODEBOOK, device=codes.device))
        elif self.ggml_type in INT4_TYPES and layer.weight.is_cuda:  # on CPU both paths dequantize in torch
            repack_for_int4_kernels(layer, self.ggml_type)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if hasattr(layer, "weight_absmax"):  # IQ4_NL / IQ4_XS on the codebook kernels
            return codebook_linear(layer, x, layer.weight_absmax, CODEBOOK_BLOCK, bias)
        if hasattr(layer, "qweight"):  # Q4_1 / Q4_K zeros are not whole numbers: the kernels apply them apart
            return int4_linear(x, layer.qweight, layer.scales, layer.zeros, self.INT4_GROUP, None, bias,
                               backend=layer.backend, integer_zeros=self.ggml_type == Q4_0)
        return gguf_linear(x, layer.weight, self.ggml_type, bias, backend=layer.backend)


class GGUFMoEMethod:
    """A MoE block's experts as the file stacks them (``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``):
    ``w13`` uint8 ``[E, 2 * inter, row_bytes]`` (gate rows then up rows of each expert) and ``w2`` ``[E, hidden,
    row_bytes]``, decoded tile by tile in the fused MoE kernel (``kernels/fused_moe.py: _moe_gguf_kernel``). On CUDA
    each stack is repacked after loading for a faster kernel where its type has one (``repack_experts``; the H200
    timed Q4_K blocks at 2.3x, Q6_K at 10x the 16-bit experts' time, the int4 experts below it): a Q4_0 / Q4_1 / Q4_K
    stack for the int4 experts' kernel, a Q8_0 / Q6_K / Q5_K stack for the 8-bit experts' kernel (int8 codes, fp32
    scales and offsets, exact); each stack on its own, so a Q4_K_M file's Q4_K gate / up run as int4 beside its Q6_K
    down as int8. Under tensor parallelism each rank holds every expert's rows of gate and up and whole blocks of
    down's inputs (``GGUFConfig.shard_tensor``)."""

    INT4_GROUP = 32  # one Q4_0 / Q4_1 block, one Q4_K sub-block

    def __init__(self, gate_up_type: int, down_type: int, input_shards: int = 1) -> None:
        self.types = (gate_up_type, down_type)
        self.input_shards = input_shards  # tensor-parallel ranks sharing down's inputs (each expert's intermediate)

    def create_weights(self, block: nn.Module) -> bool:
        experts = block.num_experts
        for param, rows, k, ggml_type, shards in (("w13", 2 * block.inter, block.hidden, self.types[0], 1),
                                                  ("w2", block.hidden, block.inter, self.types[1],
                                                   self.input_shards)):  # fmt: skip
            new_parameter(block, param, (experts, rows, _row_bytes(ggml_type, k, shards)), torch.uint8, output_dim=1,
                          dummy_fill=_random_blocks(ggml_type))
        block.params_dtype = torch.get_default_dtype()  # the model is built under its dtype
        block.stack_kinds = (BLOCKS, BLOCKS)  # w13's and w2's form: BLOCKS, INT4 or INT8 (``repack_experts``)
        return True

    def process_weights_after_loading(self, block: nn.Module) -> None:
        if block.w13.is_cuda or self.types[0] in CODEBOOK_TYPES:  # on CPU the other forms dequantize in torch
            repack_experts(block, self.types)

    def experts(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, ExpertQuant]:
        if block.stack_kinds[0] == CODEBOOK:  # IQ4 stacks: both (GGUFConfig.from_file keeps them so)
            return block.w13, block.w2, ExpertQuant(block.w13_scale, block.w2_scale, codebook=block.codebook,
                                                    bnb_block=CODEBOOK_BLOCK)
        fields: dict[str, Any] = {}
        for which, name in enumerate(("w13", "w2")):
            kind = block.stack_kinds[which]
            if kind == BLOCKS:
                fields[f"{name}_ggml"] = self.types[which]
                continue
            group = self.INT4_GROUP if kind == INT4 else INT8_GROUPS[self.types[which]]
            fields.update({f"{name}_scale": getattr(block, f"{name}_scale"), f"{name}_group": group,
                           f"{name}_offsets": getattr(block, f"{name}_offsets", None), f"{name}_int8": kind == INT8})
        return block.w13, block.w2, ExpertQuant(**fields)


def experts_as_int4(raw: torch.Tensor, ggml_type: int, in_features: int, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """A Q4_0 / Q4_1 / Q4_K expert stack (``uint8 [E, N, row_bytes]``) as the int4 experts' ``(codes [E, N, K / 8]
    int32, scales, offsets)`` (scales and offsets ``[E, K / 32, N]`` in ``dtype``, ``W = q * s + o``: every block
    fits), one expert at a time; None where a scale or offset is past ``dtype``'s range."""
    experts, n, _ = raw.shape
    words = torch.empty(experts, n, in_features // 8, dtype=torch.int32, device=raw.device)
    scales = torch.empty(experts, in_features // 32, n, dtype=dtype, device=raw.device)
    offsets = torch.empty_like(scales)
    for e in range(experts):
        int4 = q4_blocks_as_int4(raw[e], ggml_type, in_features, dtype, offsets=True)
        if int4 is None:
            return None
        words[e] = pack_int4_kernel(int4[0])
        scales[e], offsets[e] = int4[1], int4[2]
    return words, scales, offsets


def experts_as_int8(raw: torch.Tensor, ggml_type: int, in_features: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """A Q8_0 / Q6_K / Q5_K expert stack (``uint8 [E, N, row_bytes]``) as the 8-bit experts' ``(codes [E, N, K]
    int8, scales, offsets or None)`` (fp32 ``[E, K / group, N]``, ``W = q * s + o`` exactly: ``blocks_as_int8``),
    one expert at a time: 8 + 32 / group bits a weight against the blocks' 8.5 / 6.56 / 5.5, for the fused MoE's
    widening in place of ggml's per-element decode."""
    experts, n, _ = raw.shape
    group = INT8_GROUPS[ggml_type]
    codes = torch.empty(experts, n, in_features, dtype=torch.int8, device=raw.device)
    scales = torch.empty(experts, in_features // group, n, dtype=torch.float32, device=raw.device)
    offsets = torch.empty_like(scales) if ggml_type not in (Q8_0, Q6_K) else None
    for e in range(experts):
        codes[e], scales[e], o = blocks_as_int8(raw[e], ggml_type, in_features)
        if offsets is not None:
            offsets[e] = o
    return codes, scales, offsets


def experts_as_codebook(raw: torch.Tensor, ggml_type: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An IQ4_NL / IQ4_XS expert stack (``uint8 [E, N, row_bytes]``) as the codebook experts' codes ``[E, N, K / 2]``
    and fp32 absmax ``[E, N, K / 32]`` (``iq4_blocks_as_codebook``, one expert at a time)."""
    experts, n, _ = raw.shape
    codes = torch.empty(experts, n, in_features // 2, dtype=torch.uint8, device=raw.device)
    absmax = torch.empty(experts, n, in_features // CODEBOOK_BLOCK, dtype=torch.float32, device=raw.device)
    for e in range(experts):
        codes[e], absmax[e] = iq4_blocks_as_codebook(raw[e], ggml_type, in_features)
    return codes, absmax


def repack_experts(block: nn.Module, types: tuple[int, int]) -> tuple[str, str]:
    """Replace each expert stack's blocks by the form of a faster kernel: Q4_0 / Q4_1 / Q4_K by the int4 experts'
    codes, ``{w13,w2}_scale`` and ``{w13,w2}_offsets`` (``experts_as_int4``), Q8_0 / Q6_K / Q5_K by the 8-bit
    experts' (``experts_as_int8``; offsets for Q5_K only), IQ4_NL / IQ4_XS by the 4-bit codebook experts' codes and
    block absmax (``experts_as_codebook``; the table in ``block.codebook``). ``block.stack_kinds`` records each
    stack's form, which is returned. A stack of another type, or an int4 one whose scales do not fit the block's
    dtype (logged), keeps its blocks; one already repacked stays as it is."""
    kinds = list(block.stack_kinds)
    for which, (name, k) in enumerate((("w13", block.hidden), ("w2", block.inter))):
        if kinds[which] != BLOCKS:
            continue
        raw, ggml_type = getattr(block, name).data, types[which]
        if ggml_type in INT4_TYPES:
            repacked, kind = experts_as_int4(raw, ggml_type, k, block.params_dtype), INT4
            if repacked is None:
                logger.info("GGUF: a %s expert stack keeps its blocks (its scales do not fit %s)",
                            _type_name(ggml_type), block.params_dtype)
                continue
        elif ggml_type in INT8_TYPES:
            repacked, kind = experts_as_int8(raw, ggml_type, k), INT8
        elif ggml_type in CODEBOOK_TYPES:
            repacked, kind = experts_as_codebook(raw, ggml_type, k), CODEBOOK
            replace_parameter(block, "codebook", torch.tensor(IQ4_CODEBOOK, device=raw.device))
        else:
            continue
        for suffix, value in zip(("", "_scale", "_offsets"), repacked):
            if value is not None:
                replace_parameter(block, f"{name}{suffix}", value)
        kinds[which] = kind
    block.stack_kinds = tuple(kinds)
    return block.stack_kinds


def repack_for_int4_kernels(layer: nn.Module, ggml_type: int) -> bool:
    """Replace a Q4_0 / Q4_1 / Q4_K layer's blocks by the int4 kernels' ``qweight`` / ``scales`` / ``zeros`` (group 32);
    False (blocks kept, logged) when they do not fit that form (``q4_blocks_as_int4``)."""
    int4 = q4_blocks_as_int4(layer.weight.data, ggml_type, layer.in_features, layer.params_dtype)
    if int4 is None:
        logger.info("GGUF: a %s layer keeps its blocks (its scales and mins do not fit the int4 kernels' form in %s)",
                    _type_name(ggml_type), layer.params_dtype)
        return False
    codes, scales, zeros = int4
    replace_parameter(layer, "qweight", pack_int4_kernel(codes))
    replace_parameter(layer, "scales", scales)
    replace_parameter(layer, "zeros", zeros)
    delattr(layer, "weight")
    return True


def _random_blocks(ggml_type: int):
    """``--load-format dummy``: random bytes with every float16 scale set to a small finite value."""
    block, type_size = KEPT_TYPES[ggml_type]
    scale_bytes = [208] if ggml_type == 14 else [0] if ggml_type in (2, 8, *CODEBOOK_TYPES) else [0, 2]
    small = torch.tensor([1e-4], dtype=torch.float16).view(torch.uint8)

    def fill(tensor: torch.Tensor, gen: torch.Generator) -> None:
        values = torch.randint(0, 256, tensor.shape, dtype=torch.uint8, generator=gen)
        blocks = values.view(tensor.shape[0], -1, type_size)
        for at in scale_bytes:
            blocks[..., at], blocks[..., at + 1] = small[0], small[1]
        tensor.copy_(values)

    return fill


class GGUFEmbedding(nn.Module):
    """A ``[num_embeddings, dim]`` table kept in its GGML blocks: the token embedding (a lookup dequantizes only the
    looked-up rows) and, tied or not, the LM head (``compute_logits``: the block GEMM with fp32 output)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ggml_type: int, backend: str) -> None:
        super().__init__()
        self.embedding_dim, self.ggml_type, self.backend = embedding_dim, ggml_type, backend
        self.activation_dtype = torch.get_default_dtype()  # the model is built under its dtype
        self.weight = new_parameter(self, "weight", (num_embeddings, _row_bytes(ggml_type, embedding_dim)),
                                    torch.uint8, dummy_fill=_random_blocks(ggml_type))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize_gguf(self.weight[ids.reshape(-1)], self.ggml_type, self.embedding_dim)
        return rows.to(self.activation_dtype).reshape(*ids.shape, self.embedding_dim)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return gguf_linear(hidden, self.weight, self.ggml_type, out_dtype=torch.float32, backend=self.backend)


def resolve_model_quantization(model_config: ModelConfig, hf_config: dict[str, Any], config: EngineConfig,
                               source: ModelSource) -> ModelConfig:  # fmt: skip
    """``resolve_quantization`` for the engine's model, with GGUF files kept quantized when asked (module
    docstring)."""
    from core.layers.quantization import check_family_supports, resolve_quantization
    from core.loader import _gguf_path, resolve_load_format

    requested = config.quantization
    is_gguf = config.load_format != "dummy" and resolve_load_format(source, config.load_format) == "gguf"
    if requested == "gguf" and config.gguf_dequantize:
        raise ValueError("--quantization gguf keeps GGUF weights quantized and --gguf-dequantize dequantizes them at "
                         "load; give one of them.")
    if requested == "gguf" and not is_gguf:
        raise ValueError("--quantization gguf needs a .gguf model file (its weights keep their GGML blocks); "
                         f"{source.name} is not loaded from a GGUF file.")
    if is_gguf and requested in (None, "gguf"):
        keep = requested == "gguf"  # opt-in until the block GEMM is measured on the GPU (module docstring)
        if not keep:
            reason = "--gguf-dequantize" if config.gguf_dequantize else "the default"
            logger.info("GGUF weights dequantized at load (%s); --quantization gguf keeps them in their blocks.",
                        reason)
            return resolve_quantization(model_config, hf_config, None)
        check_family_supports(model_config.architecture, "gguf")
        return dataclasses.replace(model_config, quantization=GGUFConfig.from_file(_gguf_path(source)))
    return resolve_quantization(model_config, hf_config, requested)

