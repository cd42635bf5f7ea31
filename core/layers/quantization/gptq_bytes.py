"""GPTQ 8-, 3- and 2-bit checkpoints (AutoGPTQ / GPTQModel v1 with ``bits: 8``, e.g. Qwen's GPTQ-Int8 releases, or
``bits: 3`` / ``2``), their codes held a byte each: w8a16 on the 8-bit kernels.

Per linear layer: ``qweight`` int32 ``[in * bits / 32, out]``, ``qzeros`` int32 ``[groups, out * bits / 32]`` (v1
stores ``zero - 1``), ``scales`` ``[groups, out]`` and ``g_idx`` ``[in]``: ``W[k, n] = (q[k, n] - zero[g, n]) *
scale[g, n]`` for ``g = g_idx[k]``. Codes are packed along ``qweight``'s rows and ``qzeros``' columns in runs
(``PACKINGS``): 8-bit four a word (row ``4p + i`` in bits ``8i .. 8i + 7`` of word ``p``), 2-bit sixteen, 3-bit
thirty-two in three words, the run one little-endian bit stream (code ``j`` in bits ``3j .. 3j + 2`` of the 96, so
codes 10 and 21 straddle two words: AutoGPTQ's ``pack`` for 3 bits). The layer holds the codes as uint8 ``[out,
in]`` and the scales and zero points ``[out, groups]`` in fp32 for ``kernels/int8_gemm.py`` (3 and 2 bits: 8 bits
a weight where the checkpoint has 3 or 2, half a 16-bit weight's bytes; the summary says so); act-order
(``desc_act``) layers have their input rows sorted by group and gather x's columns by the same permutation, as the
int4 layers do (a tensor-parallel rank's share of a row-parallel layer's inputs, which falls unevenly into the
groups, regrouped into padded groups of 32 whose padding rows weigh 0).

A MoE block's experts (``GPTQBytesMoEMethod``) load each expert's tensors into stacked ``{w13,w2}_qweight`` /
``_qzeros`` / ``_scales`` / ``_g_idx`` (as the int4 experts do), then become the 8-bit experts' kernel form
(``kernels/fused_moe.py``: ``ExpertQuant.w13_int8``): uint8 codes ``[E, N, K]``, fp32 scales and offsets
``o = -zero * scale`` ``[E, K / group, N]`` (``W = q s + o``). Act-order experts have each expert's input rows
sorted by group and the kernel reads the activations' columns through its permutation, as the int4 experts do.
Under tensor parallelism every rank holds every expert's slice of the intermediate dimension (codes, zero points and
scales cut as a dense layer's: by columns, or whole groups of down's inputs); an act-order down projection's rank
holds every group's scales and regroups each expert's rows into padded groups of 32, as the int4 experts do.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from core.layers.quantization.base import LinearMethod, new_parameter, replace_parameter
from core.layers.quantization.int4 import (GPTQConfig, Int4MoEMethod, _fill_random_int32, _fill_scales,
                                           gptq_checkpoint_options, natural_groups, regroup_expert_rows,
                                           regrouped_expert_rows, rows_in_group_order)
from kernels.fused_moe import ExpertQuant
from kernels.int8_gemm import int8_linear

# bits -> (codes, int32 words) of a packed run: the run's words are one little-endian bit stream of its codes
PACKINGS = {8: (4, 1), 3: (32, 3), 2: (16, 1)}


def unpack_rows(packed: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``[rows * bits / 32, cols]`` int32 -> ``[rows, cols]`` int32 codes: each run of ``PACKINGS[bits][1]`` rows of
    words is a bit stream of ``PACKINGS[bits][0]`` codes, code ``j`` in its bits ``bits * j`` on. One shift and
    mask a code over the whole tensor (two where a code straddles words; int32 shifts: each keeps only bits below
    the word's sign, so the arithmetic shift's fill is masked away)."""
    count, words = PACKINGS[bits]
    runs = packed.to(torch.int32).reshape(-1, words, packed.shape[1])
    codes = torch.empty(runs.shape[0], count, packed.shape[1], dtype=torch.int32, device=packed.device)
    for j in range(count):
        word, shift = divmod(bits * j, 32)
        low = min(bits, 32 - shift)  # bits of the code in this word
        codes[:, j] = (runs[:, word] >> shift) & ((1 << low) - 1)
        if low < bits:
            codes[:, j] |= (runs[:, word + 1] & ((1 << (bits - low)) - 1)) << low
    return codes.reshape(-1, packed.shape[1])


def unpack_columns(packed: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``[rows, cols * bits / 32]`` int32 -> ``[rows, cols]``: :func:`unpack_rows` along the columns."""
    return unpack_rows(packed.t().contiguous(), bits).t()


class GPTQBytesConfig(GPTQConfig):
    """GPTQ's config at 8, 3 or 2 bits a code: the same tensor names and tensor-parallel cuts
    (``_Int4Config.shard_tensor`` in runs of ``pack`` codes over ``pack_words`` int32s), layers and experts of its
    own."""

    def __init__(self, *, bits: int = 8, **options: Any) -> None:
        super().__init__(**options)
        self.bits = bits

    @property
    def pack(self) -> int:
        return PACKINGS[self.bits][0]

    @property
    def pack_words(self) -> int:
        return PACKINGS[self.bits][1]

    @property
    def pack_factor(self) -> Fraction:
        """Output features a packed ``qzeros`` word holds (3 bits: 32 in 3 words): a merged part's columns start at
        its first feature divided by it (``core/models/weights.py``)."""
        return Fraction(self.pack, self.pack_words)

    @property
    def packing(self) -> str:
        """The packing as an error message names it."""
        return f"the packing of {self.pack} codes in {self.pack_words} int32{'s' if self.pack_words > 1 else ''}"

    def words(self, codes: int) -> int:
        """The int32s ``codes`` packed codes fill (a multiple of ``pack``)."""
        return codes // self.pack * self.pack_words

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> GPTQBytesConfig:
        bits, group = int(qc.get("bits", 8)), int(qc.get("group_size", 128))
        if group != -1 and (group <= 0 or group % 32):
            raise ValueError(f"GPTQ {bits}-bit group_size {group} is not supported; supported: multiples of 32, "
                             "or -1.")
        config = cls(bits=bits, group_size=group, zero_point=not qc.get("sym", True),
                     desc_act=bool(qc.get("desc_act", False)))
        return gptq_checkpoint_options(config, qc)

    def layer_method(self, prefix: str) -> LinearMethod | None:
        return GPTQBytesLinearMethod(self, self.input_shards(prefix))

    def experts_method(self, prefix: str) -> GPTQBytesMoEMethod | None:
        return None if self.is_skipped(prefix) else GPTQBytesMoEMethod(self, prefix)

    def summary(self) -> str:
        rules = f", {len(self.dynamic_rules)} dynamic rules" if self.dynamic_rules else ""
        held = "" if self.bits == 8 else ", codes held a byte each"
        return (f"gptq {self.bits}-bit (group {self.group_size}{', act-order' if self.desc_act else ''}{held}"
                f"{rules})")


class GPTQBytesLinearMethod(LinearMethod):
    """The layer's GPTQ tensors as loaded, then uint8 codes ``[out, in]`` with fp32 scales and zero points ``[out,
    groups]`` (module docstring)."""

    def __init__(self, config: GPTQBytesConfig, input_shards: int = 1) -> None:
        self.config, self.input_shards = config, input_shards  # ranks sharing the layer's input features

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:  # fmt: skip
        group = in_features if self.config.group_size == -1 else self.config.group_size
        out = sum(output_sizes)
        # Act-order's row-parallel layers hold every group's scales: their rows need not fill whole groups
        all_groups = self.config.desc_act and self.config.group_size != -1 and self.input_shards > 1
        grouped = in_features * self.input_shards if all_groups else in_features
        config = self.config
        if grouped % group or in_features % config.pack or any(size % config.pack for size in output_sizes):
            raise ValueError(f"GPTQ {config.bits}-bit: a layer of {in_features} inputs and outputs "
                             f"{tuple(output_sizes)} does not fit groups of {group} and {config.packing}.")
        groups = grouped // group
        layer.group_size = group
        new_parameter(layer, "qweight", (config.words(in_features), out), torch.int32, output_dim=1,
                      dummy_fill=_fill_random_int32)
        new_parameter(layer, "qzeros", (groups, config.words(out)), torch.int32, output_dim=1,
                      pack_factor=config.pack_factor, dummy_fill=_fill_random_int32)
        new_parameter(layer, "scales", (groups, out), params_dtype, output_dim=1, dummy_fill=_fill_scales)
        new_parameter(layer, "g_idx", (in_features,), torch.int32, output_dim=None,
                      dummy_fill=natural_groups(group, in_features))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        bits = self.config.bits
        q = unpack_rows(layer.qweight.data, bits)  # [in, out]
        zeros = unpack_columns(layer.qzeros.data, bits) + self.config.zero_offset  # v1 stores zero - 1
        scales, g_idx = layer.scales.data, layer.g_idx.data.long()
        # act order: rows sorted by group; a rank's rows of an act-order layer (every group held) regrouped
        q, zeros, scales, perm, layer.group_size = rows_in_group_order(q, zeros, scales, g_idx, layer.group_size,
                                                                       f"GPTQ {bits}-bit")  # fmt: skip
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            delattr(layer, name)
        replace_parameter(layer, "weight", q.t().to(torch.uint8).contiguous())
        replace_parameter(layer, "weight_scale", scales.t().float().contiguous())
        replace_parameter(layer, "weight_zeros", zeros.t().float().contiguous())
        layer.perm = perm

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.perm is not None:
            x = x[..., layer.perm]
        return int8_linear(x, layer.weight, layer.weight_scale, bias, zeros=layer.weight_zeros,
                           group=layer.group_size, backend=layer.backend)


class GPTQBytesMoEMethod(Int4MoEMethod):
    """A MoE block's GPTQ 8-, 3- or 2-bit experts (module docstring): each expert's ``qweight`` / ``qzeros`` /
    ``scales`` / ``g_idx`` stacked as a merged projection's would be, then uint8 codes ``[E, N, K]`` with fp32
    scales and offsets ``[E, K / group, N]`` for the fused MoE kernel's 8-bit experts."""

    def __init__(self, config: GPTQBytesConfig, prefix: str = "") -> None:
        super().__init__(config)
        self.prefix = prefix

    def create_weights(self, block: nn.Module) -> bool:
        if self.dynamic_check is not None:
            self.dynamic_check[0].check_uniform_experts(self.dynamic_check[1], block.num_experts)
        experts, config = block.num_experts, self.config
        for param, rows, k, group, parts in self._projections(block):
            grouped = k * config.tp_size if self._all_groups(param) else k
            if grouped % group or k % config.pack or rows % config.pack or k % 16:
                raise ValueError(f"GPTQ {config.bits}-bit: an expert's {param} (input size {k}, {rows} outputs) does "
                                 f"not fit groups of {group}, {config.packing} and the 8-bit experts' 16-input "
                                 "steps.")
            out = experts * rows
            new_parameter(block, f"{param}_qweight", (config.words(k), out), torch.int32, output_dim=1,
                          dummy_fill=_fill_random_int32)
            new_parameter(block, f"{param}_qzeros", (grouped // group, config.words(out)), torch.int32,
                          output_dim=1, pack_factor=config.pack_factor, dummy_fill=_fill_random_int32)
            new_parameter(block, f"{param}_scales", (grouped // group, out), torch.get_default_dtype(), output_dim=1,
                          dummy_fill=_fill_scales)
            new_parameter(block, f"{param}_g_idx", (experts * parts, k), torch.int32, output_dim=0,
                          pack_factor=out // (experts * parts), dummy_fill=natural_groups(group, k))
        return True

    def process_weights_after_loading(self, block: nn.Module) -> None:
        experts, bits = block.num_experts, self.config.bits
        for param, rows, k, group, parts in self._projections(block):
            qweight, qzeros = getattr(block, f"{param}_qweight").data, getattr(block, f"{param}_qzeros").data
            scales, g_idx = getattr(block, f"{param}_scales").data.float(), getattr(block, f"{param}_g_idx").data
            zeros = unpack_columns(qzeros, bits) + self.config.zero_offset  # v1 stores zero - 1 (8-bit sym: 127)
            regroup = self._all_groups(param)  # a rank's share of act-order down rows: equal groups of 32, padded
            perms = None if regroup else self.act_orders(g_idx, param, k, group, parts)  # rows sorted by group
            total = regrouped_expert_rows(g_idx, scales.shape[0]) if regroup else k
            codes = torch.empty(experts, rows, total, dtype=torch.uint8, device=qweight.device)
            scale = scales.new_empty(experts, total // (32 if regroup else group), rows)
            offsets = torch.empty_like(scale)
            if regroup:
                perms = torch.empty(experts, total, dtype=torch.long, device=qweight.device)
            for e in range(experts):  # one expert at a time: the unpacked int32 codes stay small
                cols = slice(e * rows, (e + 1) * rows)
                q = unpack_rows(qweight[:, cols], bits)  # [K, rows]
                z, s = zeros[:, cols], scales[:, cols]
                if regroup:
                    q, z, s, perms[e] = regroup_expert_rows(q, z, s, g_idx[e], total)
                elif perms is not None:
                    q = q[perms[e]]
                codes[e] = q.t().to(torch.uint8)
                scale[e], offsets[e] = s, -z.float() * s
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                delattr(block, f"{param}_{name}")
            replace_parameter(block, param, codes)
            replace_parameter(block, f"{param}_scale", scale)
            replace_parameter(block, f"{param}_offsets", offsets)
            setattr(block, f"{param}_perm", None if perms is None else perms.to(torch.int32).contiguous())
            setattr(block, f"{param}_group", 32 if regroup else group)

    def experts(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, ExpertQuant]:
        return block.w13, block.w2, ExpertQuant(block.w13_scale, block.w2_scale, w13_group=block.w13_group,
                                                w2_group=block.w2_group,
                                                w13_offsets=block.w13_offsets, w2_offsets=block.w2_offsets,
                                                w13_int8=True, w2_int8=True, w13_perm=block.w13_perm,
                                                w2_perm=block.w2_perm)
