"""AWQ, GPTQ and compressed-tensors W4A16 int4 weights (w4a16): loaded in their checkpoint layouts, then repacked
into one kernel layout; dense layers here (``Int4LinearMethod``) and a MoE block's experts (``Int4MoEMethod``).

Checkpoint layouts (``y = x @ W`` with ``W[k, n] = (q[k, n] - zero[g, n]) * scale[g, n]``, ``g`` the group of input
row ``k``):

- AutoAWQ GEMM: ``qweight`` int32 ``[in, out / 8]``, eight output columns per int32 in AWQ's interleaved nibble
  order (nibble ``i`` holds column ``AWQ_ORDER[i]`` of the eight); ``qzeros`` int32 ``[in / group, out / 8]`` in
  the same order; ``scales`` ``[in / group, out]``; groups are consecutive input rows.
- GPTQ v1: ``qweight`` int32 ``[in / 8, out]``, eight input rows per int32 (nibble ``i`` = row ``8j + i``);
  ``qzeros`` int32 ``[groups, out / 8]`` (sequential nibbles) storing ``zero - 1``; ``scales`` ``[groups, out]``;
  ``g_idx`` int32 ``[in]``: the group of each input row (with ``desc_act`` / act-order, not ``k // group``).
- compressed-tensors ``pack-quantized`` (symmetric): ``weight_packed`` int32 ``[out, in / 8]`` (nibble ``i`` of word
  ``j`` = input ``8j + i``, stored as ``q + 8``), ``weight_scale`` ``[out, groups]``, ``weight_shape`` (dropped), and
  with group act-order ``weight_g_idx``.

Kernel layout (``kernels/int4_gemm.py: pack_int4_kernel``): ``qweight`` int32 ``[out, in / 8]``, each output
column's codes contiguous along the input dim (interleaved within blocks of 32 rows, for the decode kernel's wide
loads), groups of consecutive rows, ``scales`` and ``zeros`` (as numbers) ``[groups, out]`` in the activation dtype,
and for act-order checkpoints a permutation of the input rows (x's columns are gathered by it before the GEMM).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from core.layers.quantization.base import (LinearMethod, QuantConfig, module_listed, new_parameter, plain_shard,
                                           replace_parameter, whole_units)
from kernels.backend import use_triton
from kernels.fused_moe import ExpertQuant
from kernels.int4_gemm import (AWQ_ORDER, KERNEL_K_BLOCK, int4_linear, int4_qkv_rope_cache, pack_int4_kernel,
                               tile_int4, tiled_layout_pays, unpack_int4_columns, unpack_int4_rows)
from kernels.int4_gemv_gluon import MAX_M as INT4_GEMV_MAX_M

logger = logging.getLogger(__name__)

PACK = 8  # int4 values per int32


def _bits_and_group(qc: dict[str, Any], method: str) -> tuple[int, int]:
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"{method} with {bits}-bit weights is not supported; supported: 4-bit.")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if group != -1 and group <= 0:
        raise ValueError(f"{method} group_size {group} is not valid (a positive size, or -1 for one group).")
    return bits, group


class _Int4Config(QuantConfig):
    pack = PACK  # codes a packed run holds (GPTQ 8-bit: 4; 3-bit: 32)
    pack_words = 1  # int32s a packed run fills (GPTQ 3-bit: 3)
    zero_offset = 1  # GPTQ's qzeros hold ``zero - zero_offset``: v1 stores zero - 1, v2 (gptq_v2) the zero itself

    def __init__(self, *, group_size: int, zero_point: bool, desc_act: bool = False,
                 skipped: Sequence[str] = ()) -> None:  # fmt: skip
        self.group_size = group_size  # -1: one group over the whole input dim
        self.zero_point = zero_point
        self.desc_act = desc_act
        self.skipped = tuple(skipped)

    @property
    def layout(self) -> str:
        """The checkpoint's tensor layout: ``awq``, ``gptq`` or ``ct`` (compressed-tensors ``pack-quantized``)."""
        return self.name

    def is_skipped(self, prefix: str) -> bool:
        """Whether the checkpoint left module ``prefix`` unquantized (``module_listed``)."""
        return module_listed(self.skipped, self.global_prefix(prefix))

    def linear_method(self, prefix: str) -> LinearMethod | None:
        if self.is_skipped(prefix):
            return None
        return Int4LinearMethod(self, input_shards=self.input_shards(prefix))

    def shard_tensor(self, name: str, tensor: torch.Tensor, parallel: str, start: int, length: int) -> torch.Tensor:
        """Packed codes, zero points, scales and group indices cut by output or input features, in whole packed
        int32s and whole groups. GPTQ act-order's row-parallel layers keep every group's scales and zero points
        (their input rows are spread over all groups; ``g_idx`` says which) and the checkpoint's group numbers."""
        suffix = name.rsplit(".", 1)[-1]
        layer = name.rsplit(".", 1)[0]
        if self.layout == "ct" and suffix in ("weight_packed", "weight_scale"):
            # [out, in / 8] and [out, in / group]: output rows, or whole int32s / groups of inputs
            if parallel == "column":
                return tensor.narrow(0, start, length)
            return self.shard_tensor(f"{layer}.qweight" if suffix == "weight_packed" else f"{layer}.scales",
                                     tensor.t(), parallel, start, length).t()
        suffix = _CT_NAMES.get(suffix, suffix) if self.layout == "ct" else suffix
        if suffix not in ("qweight", "qzeros", "scales", "g_idx"):
            return plain_shard(tensor, parallel, start, length)

        def units(size: int, what: str) -> tuple[int, int]:
            return whole_units(self.name, layer, parallel, start, length, size, what)

        def packed_words() -> tuple[int, int]:
            first, count = units(self.pack, f"runs of {self.pack} packed codes")
            return first * self.pack_words, count * self.pack_words

        if parallel == "column":  # output features: the last dim of every tensor but g_idx
            if suffix == "g_idx":
                return tensor
            packed = suffix == "qzeros" or (suffix == "qweight" and self.layout == "awq")
            first, count = packed_words() if packed else (start, length)
            return tensor.narrow(1, first, count)
        group = self.group_size
        if suffix == "qweight":
            first, count = (start, length) if self.layout == "awq" else packed_words()
            return tensor.narrow(0, first, count)
        if group == -1:  # one group over every input feature: each rank's rows use it
            return tensor.narrow(0, start, length) if suffix == "g_idx" else tensor
        if self.desc_act:
            return tensor.narrow(0, start, length) if suffix == "g_idx" else tensor
        first, count = units(group, f"groups (group_size={group})")
        if suffix == "g_idx":
            return tensor.narrow(0, start, length) - first  # the rank's groups are numbered from 0
        return tensor.narrow(0, first, count)

    def permute_outputs(self, name: str, tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """AWQ / GPTQ tensors hold output features in their columns (``qweight``, ``qzeros``, ``scales``), packed
        ones in whole int32s, which ``order`` must move whole; ``g_idx`` indexes inputs. compressed-tensors' are
        output rows (the default)."""
        suffix = name.rsplit(".", 1)[-1]
        if suffix in ("g_idx", "weight_g_idx"):  # the input rows' groups
            return tensor
        if self.layout == "ct" or suffix not in ("qweight", "qzeros", "scales"):
            return super().permute_outputs(name, tensor, order)
        if suffix == "qzeros" or (suffix == "qweight" and self.layout == "awq"):  # packed along the outputs
            runs = order.reshape(-1, self.pack)
            if not (torch.equal(runs - runs[:, :1], torch.arange(self.pack).expand_as(runs))
                    and bool((runs[:, 0] % self.pack == 0).all())):  # fmt: skip
                raise ValueError(f"{self.name}: {name} packs {self.pack} output features a run of int32s, and the "
                                 "family's reordering of them does not move whole runs.")
            first_words = runs[:, 0] // self.pack * self.pack_words
            order = (first_words[:, None] + torch.arange(self.pack_words)).flatten()
        return tensor[:, order.to(tensor.device)]

    def moe_method(self, prefix: str) -> Int4MoEMethod | None:
        return None if self.is_skipped(prefix) else Int4MoEMethod(self)

    def summary(self) -> str:
        extra = ", act-order" if self.desc_act else ""
        zeros = "zero points" if self.zero_point else "symmetric"
        return f"{self.name} int4 (group {self.group_size}, {zeros}{extra})"


class AWQConfig(_Int4Config):
    name = "awq"

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> AWQConfig:
        _, group = _bits_and_group(qc, "AWQ")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported; supported: gemm (AutoAWQ's GEMM packing).")
        if not qc.get("zero_point", True):
            raise ValueError("AWQ without zero points (zero_point: false) is not supported; supported: AutoAWQ GEMM "
                             "checkpoints with zero points.")
        return cls(group_size=group, zero_point=True,
                   skipped=qc.get("modules_to_not_convert") or ())


GPTQ_BITS = (2, 3, 4, 8)  # 4: the int4 kernels; 2, 3 and 8: codes held a byte each (gptq_bytes.py)


class GPTQConfig(_Int4Config):
    name = "gptq"
    bits = 4
    # GPTQModel's ``dynamic`` per-module rules, in order: (leave 16-bit, regex, overrides of bits / group_size /
    # desc_act / sym); the first whose regex matches a module's checkpoint name from its start decides it
    dynamic_rules: tuple[tuple[bool, str, dict[str, Any]], ...] = ()

    def module_config(self, name: str) -> GPTQConfig | None:
        """The config the ``dynamic`` rules give checkpoint module ``name``: None where a ``-:`` rule leaves it 16-bit,
        a copy with a rule's overrides (its own method: the int4 kernels at 4 bits, byte codes at 2, 3 or 8), else
        this config."""
        for skip, pattern, overrides in self.dynamic_rules:
            if re.match(pattern, name):
                return None if skip else self._overridden(overrides)
        return self

    def _overridden(self, overrides: dict[str, Any]) -> GPTQConfig:
        from core.layers.quantization.gptq_bytes import GPTQBytesConfig

        bits = int(overrides.get("bits", self.bits))
        part = copy.copy(self)
        part.__dict__.pop("bits", None)
        part.__class__ = GPTQConfig if bits == 4 else GPTQBytesConfig
        if bits != 4:
            part.bits = bits
        part.group_size = int(overrides.get("group_size", self.group_size))
        part.zero_point = not overrides.get("sym", not self.zero_point)
        part.desc_act = bool(overrides.get("desc_act", self.desc_act))
        part.dynamic_rules = ()
        return part

    def linear_method(self, prefix: str) -> LinearMethod | None:
        config = self.module_config(self.global_prefix(prefix))
        return None if config is None else config.layer_method(prefix)

    def layer_method(self, prefix: str) -> LinearMethod | None:
        """This config's own method for a linear layer (the ``dynamic`` rules already applied)."""
        return super().linear_method(prefix)

    def moe_method(self, prefix: str) -> Int4MoEMethod | None:
        """The experts' method: the ``dynamic`` rules read on expert 0's projections (one method runs a block's
        experts: every expert is checked against it when the block is built, ``Int4MoEMethod.create_weights``)."""
        name = self.global_prefix(prefix)
        configs = [self.module_config(f"{name}.experts.0.{p}_proj") for p in ("gate", "up", "down")]
        if len({_rule_key(c) for c in configs}) > 1:
            raise ValueError(f"GPTQ dynamic rules give the experts of {name} different formats across gate / up / "
                             "down; one format per MoE block is supported.")
        if configs[0] is None:
            return None
        method = configs[0].experts_method(prefix)
        if method is not None and self.dynamic_rules:
            method.dynamic_check = (self, name)
        return method

    def experts_method(self, prefix: str) -> Int4MoEMethod | None:
        """This config's own method for a MoE block's experts (the ``dynamic`` rules already applied)."""
        return super().moe_method(prefix)

    def check_uniform_experts(self, name: str, experts: int) -> None:
        """ValueError unless the ``dynamic`` rules give every expert of MoE block ``name`` one format."""
        first = _rule_key(self.module_config(f"{name}.experts.0.gate_proj"))
        for e in range(experts):
            for proj in ("gate", "up", "down"):
                if _rule_key(self.module_config(f"{name}.experts.{e}.{proj}_proj")) != first:
                    raise ValueError(f"GPTQ dynamic rules give expert {e} of {name} another format than expert 0; "
                                     "one format per MoE block is supported (its experts are stacked).")

    def shard_tensor(self, name: str, tensor: torch.Tensor, parallel: str, start: int, length: int) -> torch.Tensor:
        config = self.module_config(name.rsplit(".", 1)[0])
        if config is None:  # left 16-bit by a ``-:`` rule
            return plain_shard(tensor, parallel, start, length)
        if config is not self:
            return config.shard_tensor(name, tensor, parallel, start, length)
        return super().shard_tensor(name, tensor, parallel, start, length)

    def summary(self) -> str:
        rules = f", {len(self.dynamic_rules)} dynamic rules" if self.dynamic_rules else ""
        return super().summary() + rules

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> QuantConfig:
        bits = int(qc.get("bits", 4))
        if bits not in GPTQ_BITS:
            raise ValueError(f"GPTQ with {bits}-bit weights is not supported; supported: "
                             f"{', '.join(f'{b}-bit' for b in GPTQ_BITS)}.")
        if bits != 4:
            _check_gptq_options(qc)
            from core.layers.quantization.gptq_bytes import GPTQBytesConfig

            return GPTQBytesConfig.from_hf(qc)
        _, group = _bits_and_group(qc, "GPTQ")
        _check_gptq_options(qc)
        config = cls(group_size=group, zero_point=not qc.get("sym", True), desc_act=bool(qc.get("desc_act", False)))
        return gptq_checkpoint_options(config, qc)


def _check_gptq_options(qc: dict[str, Any]) -> None:
    """The GPTQ checkpoint options either bit width refuses, each named."""
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; supported: gptq (v1), gptq_v2.")


_RULE_OVERRIDES = ("bits", "group_size", "desc_act", "sym")


def _dynamic_rules(dynamic: Any) -> tuple[tuple[bool, str, dict[str, Any]], ...]:
    """GPTQModel's ``dynamic``: ``{"-:regex": {}}`` leaves matching modules 16-bit, ``{"+:regex": {"bits": 8, ...}}``
    (or no prefix) quantizes them with those overrides; each checked and named where it cannot run."""
    if not dynamic:
        return ()
    if not isinstance(dynamic, dict):
        raise ValueError(f"GPTQ 'dynamic' must map module regexes to overrides, got {dynamic!r}.")
    rules = []
    for key, overrides in dynamic.items():
        skip = key.startswith("-:")
        pattern = key[2:] if key.startswith(("-:", "+:")) else key
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"GPTQ dynamic rule {key!r} is not a valid regex: {e}.") from None
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(_RULE_OVERRIDES))
        if unknown:
            raise ValueError(f"GPTQ dynamic rule {key!r} overrides {unknown}, which are not supported; supported: "
                             f"{', '.join(_RULE_OVERRIDES)}.")
        bits, group = overrides.get("bits", 4), int(overrides.get("group_size", 32))
        if bits not in GPTQ_BITS:
            raise ValueError(f"GPTQ dynamic rule {key!r}: {bits}-bit weights are not supported; supported: "
                             f"{', '.join(map(str, GPTQ_BITS))}.")
        if group != -1 and (group <= 0 or group % 32):
            raise ValueError(f"GPTQ dynamic rule {key!r}: group_size {group} is not supported; supported: multiples "
                             "of 32, or -1.")
        rules.append((skip, pattern, overrides))
    return tuple(rules)


def _rule_key(config: GPTQConfig | None) -> tuple | None:
    """What tells two configs' formats apart (None: 16-bit)."""
    return None if config is None else (config.bits, config.group_size, config.zero_point, config.desc_act)


def gptq_checkpoint_options(config: GPTQConfig, qc: dict[str, Any]) -> GPTQConfig:
    """``config`` with the GPTQ checkpoint's format (v2: ``qzeros`` hold the zero points themselves), whether it
    quantized the LM head (GPTQModel's ``lm_head: true``) and its ``dynamic`` per-module rules."""
    if str(qc.get("checkpoint_format", "gptq")).lower() == "gptq_v2":
        config.zero_offset = 0
    config.quantized_lm_head = bool(qc.get("lm_head"))
    config.dynamic_rules = _dynamic_rules(qc.get("dynamic"))
    return config


def regroup_rows(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """An int4 weight whose input rows fall into groups of unequal sizes (``g_idx``; ``order`` = its stable argsort),
    e.g. a tensor-parallel rank's share of a GPTQ act-order layer, in the kernels' form of equal groups: each
    group's rows in a run padded to a multiple of ``KERNEL_K_BLOCK`` (the new group size), each run's scales and
    zero points repeated per block. Returns the codes ``[K', N]``, zeros and scales ``[K' / block, N]``, the input
    row of each new row (padding rows: ``K``, a zero column ``int4_linear`` appends to x, so they add exactly 0)
    and the block. The product is the same; the kernels read ``K'`` rows for ``K``."""
    block = KERNEL_K_BLOCK
    counts = torch.bincount(g_idx, minlength=scales.shape[0])
    used = torch.nonzero(counts).flatten()
    padded = (counts[used] + block - 1) // block * block
    run_start = torch.cumsum(padded, 0) - padded  # where each used group's run begins in the new rows
    first_of_group = torch.cumsum(counts, 0) - counts  # where each group's rows begin in ``order``
    sorted_groups = g_idx[order]
    slot = torch.zeros(len(counts), dtype=torch.long, device=g_idx.device)  # a used group's index in ``used``
    slot[used] = torch.arange(len(used), device=g_idx.device)
    rank_in_group = torch.arange(len(order), device=g_idx.device) - first_of_group[sorted_groups]
    new_row = run_start[slot[sorted_groups]] + rank_in_group
    total = int(padded.sum())
    block_group = used.repeat_interleave(padded // block)  # the group of each new block of rows
    new_q = torch.zeros(total, q.shape[1], dtype=q.dtype, device=q.device)
    new_q[new_row] = q[order]
    rows = torch.full((total,), len(order), dtype=torch.long, device=g_idx.device)
    rows[new_row] = order
    return new_q, zeros[block_group], scales[block_group], rows, block


def regrouped_expert_rows(g_idx: torch.Tensor, groups: int) -> int:
    """How many rows :func:`regroup_expert_rows` gives every expert of ``g_idx [E, K]`` (their input rows' groups,
    of ``groups``): the longest expert's runs, each group's padded to whole ``KERNEL_K_BLOCK`` blocks."""
    counts = torch.zeros(g_idx.shape[0], groups, dtype=torch.long, device=g_idx.device)
    counts.scatter_add_(1, g_idx.long(), torch.ones_like(g_idx, dtype=torch.long))
    block = KERNEL_K_BLOCK
    return int(((counts + block - 1) // block * block).sum(1).max())


def regroup_expert_rows(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, total: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One act-order expert whose input rows fall into groups of unequal sizes (a tensor-parallel rank's share of
    down's inputs: codes ``q [K, N]``, every group's zero points and scales ``[groups, N]``, ``g_idx [K]``) in the
    experts' kernels' form of equal groups of ``KERNEL_K_BLOCK`` rows (:func:`regroup_rows`), padded to ``total``
    rows (:func:`regrouped_expert_rows`, the same for every expert). A padding row's code is its block's zero point,
    so its weight is 0 (int4: exactly; offsets ``-z s``: to fp32's rounding) whatever the activation it reads
    (column 0). Returns the codes ``[total, N]``, zero points and scales ``[total / block, N]`` and each row's input
    column (the expert's permutation)."""
    k, block = q.shape[0], KERNEL_K_BLOCK
    new_q, z, s, source, _ = regroup_rows(q, zeros, scales, g_idx.long(), torch.argsort(g_idx, stable=True))
    extra = total - new_q.shape[0]
    if extra:
        new_q = torch.cat([new_q, new_q.new_zeros(extra, new_q.shape[1])])
        z, s = (torch.cat([t, t[-1:].expand(extra // block, -1)]) for t in (z, s))
        source = torch.cat([source, source.new_full((extra,), k)])
    padding = source == k
    new_q[padding] = z.repeat_interleave(block, 0)[padding].to(new_q.dtype)
    return new_q, z, s, source.masked_fill(padding, 0)


def rows_in_group_order(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                        group: int, method: str, total: int = 0
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:  # fmt: skip
    """One 8-bit weight's codes ``q [K, N]``, zero points and scales ``[groups, N]`` in the kernels' order: act
    order's input rows sorted by group (whole groups), or, where they fall unevenly into the groups (a tensor-parallel
    rank's share, every group's scales held), regrouped into padded groups of 32 (:func:`regroup_expert_rows`;
    ``total`` rows, else the weight's own). Returns the codes, zero points, scales, the permutation of x's columns
    (None: in order) and the group size."""
    k = q.shape[0]
    if g_idx is None:
        return q, zeros, scales, None, group
    if scales.shape[0] != -(-k // group):  # unequal groups: regrouped
        total = total or regrouped_expert_rows(g_idx[None], scales.shape[0])
        return (*regroup_expert_rows(q, zeros, scales, g_idx, total), KERNEL_K_BLOCK)
    natural = torch.arange(k, device=q.device) // group
    if torch.equal(g_idx, natural):
        return q, zeros, scales, None, group
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], natural):
        raise ValueError(f"{method}: a layer's g_idx does not put {group} input rows in each group.")
    return q[perm], zeros, scales, perm, group


class CompressedTensorsInt4Config(_Int4Config):
    """compressed-tensors W4A16 (``pack-quantized``): ``weight_packed`` int32 ``[out, in / 8]`` (nibble ``i`` of word
    ``j`` = input ``8j + i``, stored as ``q + 8``), ``weight_scale`` ``[out, in / group]``, ``weight_shape``, and with
    group act-order ``weight_g_idx``. Symmetric int4 as GPTQ makes it (llm-compressor's GPTQModifier): the GPTQ
    method's kernels and support, only the layout differs."""

    name = "gptq"
    layout = "ct"

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> CompressedTensorsInt4Config:
        from core.layers.quantization.compressed_tensors import from_compressed_tensors

        config = from_compressed_tensors(qc)
        if not isinstance(config, cls):
            raise ValueError("this compressed-tensors checkpoint's scheme is not 4-bit integer weights.")
        return config

    @classmethod
    def from_ct(cls, qc: dict[str, Any], group: dict[str, Any]) -> CompressedTensorsInt4Config:
        from core.layers.quantization.compressed_tensors import integer_scheme

        weights, acts, problems = group.get("weights") or {}, group.get("input_activations"), []
        if weights.get("num_bits") != 4:
            problems.append(f"{weights.get('num_bits')}-bit integer weights (supported: 4-bit, 8-bit)")
        if acts is not None and acts.get("num_bits") != 8:
            problems.append(f"{acts.get('num_bits')}-bit activations (supported: 16-bit, W4A16, or 8-bit, W4A8 run as "
                            "W4A16)")
        size, actorder = integer_scheme(qc, group, ("pack-quantized",), "group", problems)
        if acts is not None:  # W4A8 (int4 weights, fp8 / int8 activations): the same weights, activations 16-bit
            logger.info("compressed-tensors W4A8: int4 weights run with 16-bit activations (w4a16); the checkpoint's "
                        "%s activation quantization is not applied.", acts.get("type", "int"))
        return cls(group_size=size, zero_point=False, desc_act=actorder, skipped=qc.get("ignore") or ())

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        return ((name, tensor) for name, tensor in weights if not name.endswith(".weight_shape"))

    def summary(self) -> str:
        extra = ", group act-order" if self.desc_act else ""
        return f"compressed-tensors int4 (W4A16, group {self.group_size}, symmetric{extra})"


# Checkpoint tensor names of each int4 layout -> the role they play (the GPTQ names are AWQ's plus g_idx)
_CT_NAMES = {"weight_packed": "qweight", "weight_scale": "scales", "weight_g_idx": "g_idx"}


def register_checkpoint_layout(holder: nn.Module, prefix: str, layout: str, desc_act: bool, out: int,
                               in_features: int, group: int, groups: int, dtype: torch.dtype,
                               g_idx_units: int = 0) -> None:  # fmt: skip
    """The parameters ``{prefix}...`` an int4 checkpoint of ``layout`` fills for ``out`` output rows (a merged
    projection's parts, or every expert's stacked) of ``in_features`` inputs in ``groups`` groups (module
    docstring); merged parts and experts land by their first output row (``output_dim`` / ``pack_factor``).
    ``g_idx_units``: the group indices are not one shared row but one per that many parts of ``out`` (experts:
    each expert's projections have their own act order), ``[g_idx_units, in_features]``."""

    def new_g_idx(name: str) -> None:
        fill = natural_groups(group, in_features)
        if g_idx_units:
            new_parameter(holder, name, (g_idx_units, in_features), torch.int32, output_dim=0,
                          pack_factor=out // g_idx_units, dummy_fill=fill)
        else:
            new_parameter(holder, name, (in_features,), torch.int32, output_dim=None, dummy_fill=fill)

    if layout == "ct":  # rows are output channels: [out, in / 8] codes, [out, groups] scales, no zero points
        new_parameter(holder, f"{prefix}weight_packed", (out, in_features // PACK), torch.int32,
                      dummy_fill=_fill_random_int32)
        new_parameter(holder, f"{prefix}weight_scale", (out, groups), dtype, dummy_fill=_fill_scales)
        if desc_act:
            new_g_idx(f"{prefix}weight_g_idx")
        return
    if layout == "awq":
        new_parameter(holder, f"{prefix}qweight", (in_features, out // PACK), torch.int32, output_dim=1,
                      pack_factor=PACK, dummy_fill=_fill_random_int32)
    else:
        new_parameter(holder, f"{prefix}qweight", (in_features // PACK, out), torch.int32, output_dim=1,
                      dummy_fill=_fill_random_int32)
        new_g_idx(f"{prefix}g_idx")
    new_parameter(holder, f"{prefix}qzeros", (groups, out // PACK), torch.int32, output_dim=1, pack_factor=PACK,
                  dummy_fill=_fill_random_int32)
    new_parameter(holder, f"{prefix}scales", (groups, out), dtype, output_dim=1, dummy_fill=_fill_scales)


def take_checkpoint_codes(holder: nn.Module, prefix: str, layout: str, zero_offset: int = 1
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """What :func:`register_checkpoint_layout`'s parameters loaded, in one form, the parameters dropped: codes
    ``[in, out]``, zero points and scales ``[groups, out]``, and each input row's group (None: consecutive groups,
    AWQ's and compressed-tensors' without act-order)."""
    def get(name: str) -> torch.Tensor:
        return getattr(holder, f"{prefix}{name}").data

    if layout == "ct":  # codes stored as q + 8: zero point 8
        q = unpack_int4_columns(get("weight_packed")).t()
        scales = get("weight_scale").t()
        zeros = torch.full_like(scales, 8, dtype=torch.int64)
        g_idx = get("weight_g_idx").long() if hasattr(holder, f"{prefix}weight_g_idx") else None
        names = ("weight_packed", "weight_scale", "weight_g_idx")
    elif layout == "awq":
        q = unpack_int4_columns(get("qweight"), AWQ_ORDER)
        zeros = unpack_int4_columns(get("qzeros"), AWQ_ORDER)
        scales, g_idx, names = get("scales"), None, ("qweight", "qzeros", "scales")
    else:
        q = unpack_int4_rows(get("qweight"))
        zeros = unpack_int4_columns(get("qzeros")) + zero_offset  # GPTQ v1 stores zero - 1 (sym: 7, so 8)
        scales, g_idx, names = get("scales"), get("g_idx").long(), ("qweight", "qzeros", "scales", "g_idx")
    for name in names:
        if hasattr(holder, f"{prefix}{name}"):
            delattr(holder, f"{prefix}{name}")
    return q, zeros, scales, g_idx


def natural_groups(group: int, in_features: int):
    """``--load-format dummy`` fill of a ``g_idx``: every input row in its natural group."""

    def fill(tensor: torch.Tensor, gen: torch.Generator) -> None:
        tensor.copy_(torch.arange(in_features, dtype=torch.int32) // group)

    return fill


def _fill_random_int32(tensor: torch.Tensor, gen: torch.Generator) -> None:
    if tensor.device.type == "cpu":
        tensor.copy_(torch.randint(-(2**31), 2**31 - 1, tensor.shape, dtype=torch.int32, generator=gen))
    else:
        tensor.random_(-(2**31), 2**31 - 1)


def _fill_scales(tensor: torch.Tensor, gen: torch.Generator) -> None:
    if tensor.device.type == "cpu":
        tensor.copy_(torch.empty(tensor.shape).uniform_(1e-4, 2e-4, generator=gen))
    else:
        tensor.uniform_(1e-4, 2e-4)


class Int4LinearMethod(LinearMethod):
    """One method for both layouts; ``process_weights_after_loading`` repacks into the kernel's."""

    def __init__(self, config: _Int4Config, input_shards: int = 1) -> None:
        """``input_shards``: ranks sharing the layer's input features (a row-parallel layer under tensor
        parallelism); with act-order, the layer then holds every group's scales (``_Int4Config.shard_tensor``)."""
        self.config = config
        self.input_shards = input_shards

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: Sequence[int],
                       params_dtype: torch.dtype) -> None:  # fmt: skip
        out = sum(output_sizes)
        group = in_features if self.config.group_size == -1 else self.config.group_size
        name = self.config.name
        # Act-order's row-parallel layers hold every group's scales: their rows need not fill whole groups
        all_groups = self.config.desc_act and self.config.group_size != -1 and self.input_shards > 1
        grouped = in_features * self.input_shards if all_groups else in_features
        described = in_features if self.input_shards == 1 else (f"{in_features} (this rank's share of "
                                                                f"{in_features * self.input_shards})")
        if grouped % group or in_features % PACK:
            raise ValueError(f"{name}: a layer's input size {described} must be a multiple of the group size {group} "
                             f"and of {PACK}.")
        if in_features % KERNEL_K_BLOCK:
            raise ValueError(f"{name}: a layer's input size {described} must be a multiple of {KERNEL_K_BLOCK} "
                             "(the int4 kernels' layout interleaves codes in blocks of 32 input rows).")
        if any(size % PACK for size in output_sizes):
            raise ValueError(f"{name}: output sizes {tuple(output_sizes)} must be multiples of {PACK} (int4 packing).")
        groups = grouped // group
        layer.group_size = group
        # q, k, v shards (the last two alike): a qkv projection, whose GEMV may do the attention prep
        layer.int4_qkv = len(output_sizes) == 3 and output_sizes[1] == output_sizes[2]
        register_checkpoint_layout(layer, "", self.config.layout, self.config.desc_act, out, in_features, group,
                                   groups, params_dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        group = layer.group_size
        q, zeros, scales, g_idx = take_checkpoint_codes(layer, "", self.config.layout, self.config.zero_offset)
        perm = None
        natural = torch.arange(q.shape[0], device=q.device) // group
        groups = -(-q.shape[0] // group)
        if g_idx is not None and scales.shape[0] != groups:  # a rank's rows of an act-order layer: every group held
            first = int(g_idx.min())
            if torch.equal(g_idx - first, natural):  # its rows are whole groups in order (GPTQ static_groups, dummy)
                scales, zeros, g_idx = scales[first: first + groups], zeros[first: first + groups], natural
        if g_idx is not None and not torch.equal(g_idx, natural):  # act-order: rows sorted by group
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]:
                raise ValueError(f"{self.config.name}: g_idx of a layer names groups outside its {scales.shape[0]} "
                                 f"groups (from {int(g_idx.min())} to {int(g_idx.max())}).")
            perm = torch.argsort(g_idx, stable=True)
            if torch.equal(g_idx[perm], natural):
                q = q[perm]
            else:  # groups of other sizes: a rank's share of an act-order layer's input rows
                q, zeros, scales, perm, group = regroup_rows(q, zeros, scales, g_idx, perm)
                layer.group_size = group
            perm = perm.to(torch.int32)
        if scales.shape[0] != -(-q.shape[0] // group):
            raise ValueError(f"{self.config.name}: a layer's {scales.shape[0]} groups of scales do not fit its "
                             f"{q.shape[0]} input rows in groups of {group}.")
        qweight, scales, zeros = pack_int4_kernel(q), scales.contiguous(), zeros.to(scales.dtype).contiguous()
        # The tiled layout where the Gluon GEMV serves decode rows, but not for a qkv projection (its GEMV's rotary
        # epilogue reads the plain layout)
        layer.tiled = not layer.int4_qkv and tiled_layout_pays(qweight, scales, group)
        if layer.tiled:
            qweight, scales, zeros = tile_int4(qweight, scales, zeros)
        replace_parameter(layer, "qweight", qweight)
        replace_parameter(layer, "scales", scales)
        replace_parameter(layer, "zeros", zeros)
        layer.perm = perm

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int4_linear(x, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.perm, bias,
                           backend=layer.backend, tiled=layer.tiled)

    def may_rope_cache(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Decode rows on the GPU (the Gluon GEMV's few rows) of a qkv layer without a bias."""
        return (isinstance(x, torch.Tensor) and x.is_cuda and x.dim() == 2 and x.shape[0] <= INT4_GEMV_MAX_M
                and layer.bias is None and not layer.tiled and use_triton(x, layer.backend))  # fmt: skip

    def apply_rope_cache(self, layer: nn.Module, x: torch.Tensor, **rope) -> torch.Tensor | None:
        """The qkv product with the attention prep in the int4 GEMV's epilogue (``int4_qkv_rope_cache``), or None
        where that kernel does not serve it."""
        if not self.may_rope_cache(layer, x):
            return None
        return int4_qkv_rope_cache(x, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.perm, **rope)


class Int4MoEMethod:
    """A sparse MoE block's experts from an AWQ, GPTQ or compressed-tensors checkpoint: each expert's gate, up and
    down load in the checkpoint's layout into stacked parameters (``w13_qweight`` holds every expert's gate and up
    columns, as a merged projection would; ``w2_qweight`` every down; ``register_checkpoint_layout``), then each
    expert's codes are repacked into the int4 kernel layout
    (``[E, N, K / 8]``) with its scales and zero points ``[E, K / group, N]``, which the fused MoE kernel dequantizes
    in registers (``kernels/fused_moe.py``: ``ExpertQuant``). GPTQ act-order experts (each expert's input rows in an
    order of their own, ``g_idx``): every expert's rows sorted by group at load, and the kernel reads the
    activations' columns in that order (``ExpertQuant.w13_perm`` / ``w2_perm``). Under tensor parallelism a rank's
    share of an act-order down projection's inputs falls unevenly into the groups: it holds every group's scales,
    and each expert's rows are regrouped into padded groups of 32 (``regroup_experts``), as a dense layer's are."""

    def __init__(self, config: _Int4Config) -> None:
        self.config = config

    def _projections(self, block: nn.Module) -> tuple[tuple[str, int, int, int, int], ...]:
        """(name, output rows per expert, input size K, group, projections per expert) of w13 and w2."""
        experts_k = (block.hidden, block.inter)
        groups = [k if self.config.group_size == -1 else self.config.group_size for k in experts_k]
        return ("w13", 2 * block.inter, block.hidden, groups[0], 2), ("w2", block.hidden, block.inter, groups[1], 1)

    def _all_groups(self, param: str) -> bool:
        """Whether ``param``'s scales are every group's: act-order down projections under tensor parallelism, whose
        rank's share of the inputs falls unevenly into the groups (``_Int4Config.shard_tensor`` keeps them all)."""
        return param == "w2" and self.config.desc_act and self.config.group_size != -1 and self.config.tp_size > 1

    dynamic_check: tuple[GPTQConfig, str] | None = None  # (root config, block name): GPTQ ``dynamic`` rules to check

    def create_weights(self, block: nn.Module) -> bool:
        if self.dynamic_check is not None:
            self.dynamic_check[0].check_uniform_experts(self.dynamic_check[1], block.num_experts)
        name = self.config.name
        experts = block.num_experts
        for param, rows, k, group, parts in self._projections(block):
            grouped = k * self.config.tp_size if self._all_groups(param) else k
            if grouped % group or k % KERNEL_K_BLOCK or group % KERNEL_K_BLOCK or rows % PACK:
                raise ValueError(f"{name}: an expert's {param} (input size {k}, {rows} outputs) does not fit the int4 "
                                 f"experts' kernel: the input size must be a multiple of the group size {group}, "
                                 f"which must be a multiple of {KERNEL_K_BLOCK}; the outputs of {PACK}.")
            register_checkpoint_layout(block, f"{param}_", self.config.layout, self.config.desc_act, experts * rows,
                                       k, group, grouped // group, torch.get_default_dtype(),
                                       g_idx_units=experts * parts)  # fmt: skip
        return True

    def process_weights_after_loading(self, block: nn.Module) -> None:
        for param, rows, k, group, parts in self._projections(block):
            q, zeros, scales, g_idx = take_checkpoint_codes(block, f"{param}_", self.config.layout,
                                                            self.config.zero_offset)
            if self._all_groups(param):  # each expert's rows regrouped into equal groups of 32
                q, zeros, scales, perm = self.regroup_experts(q, zeros, scales, g_idx, rows)
                k, group = q.shape[0], KERNEL_K_BLOCK
            else:
                perm = None if g_idx is None else self._sort_rows_by_group(q, g_idx, param, rows, k, group, parts)
            setattr(block, f"{param}_perm", perm)
            setattr(block, f"{param}_group", group)
            self._store(block, param, q, zeros, scales, rows, k, group)

    @staticmethod
    def regroup_experts(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, rows: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Every expert's down rows (``q [K, E * rows]``, every group's ``zeros`` / ``scales [groups, E * rows]``,
        ``g_idx [E, K]``) regrouped (:func:`regroup_expert_rows`) to one length ``K'``: the codes ``[K', E * rows]``,
        zero points and scales ``[K' / 32, E * rows]`` and the permutations ``[E, K']`` int32."""
        total = regrouped_expert_rows(g_idx, scales.shape[0])
        experts = g_idx.shape[0]
        new_q = q.new_empty(total, q.shape[1])
        new_z = zeros.new_empty(total // KERNEL_K_BLOCK, zeros.shape[1])
        new_s = scales.new_empty(total // KERNEL_K_BLOCK, scales.shape[1])
        perms = torch.empty(experts, total, dtype=torch.int32, device=q.device)
        for e in range(experts):
            cols = slice(e * rows, (e + 1) * rows)
            new_q[:, cols], new_z[:, cols], new_s[:, cols], perms[e] = regroup_expert_rows(
                q[:, cols], zeros[:, cols], scales[:, cols], g_idx[e], total)
        return new_q, new_z, new_s, perms

    def _sort_rows_by_group(self, q: torch.Tensor, g_idx: torch.Tensor, param: str, rows: int, k: int, group: int,
                            parts: int) -> torch.Tensor | None:  # fmt: skip
        """Each expert's act order (``g_idx [E * parts, K]``): its codes' input rows (``q [K, E * rows]``, in place)
        sorted by group (:meth:`act_orders`); returns the permutations ``[E, K]`` int32, or None where every
        expert's groups are already in order."""
        perms = self.act_orders(g_idx, param, k, group, parts)
        if perms is None:
            return None
        for e, perm in enumerate(perms):
            q[:, e * rows: (e + 1) * rows] = q[perm, e * rows: (e + 1) * rows]
        return perms.to(torch.int32).contiguous()

    def expert_g_idx(self, g_idx: torch.Tensor, parts: int, k: int) -> torch.Tensor:
        """Each expert's input rows' groups ``[E, K]`` from the stacked ``g_idx [E * parts, K]``: an expert's gate
        and up read one input, so one act order is expected (ValueError otherwise)."""
        per_expert = g_idx.long().reshape(-1, parts, k)
        if not torch.equal(per_expert, per_expert[:, :1].expand_as(per_expert)):
            raise ValueError(f"{self.config.name}: an expert's gate and up projections have different g_idx; they "
                             "read one input, so one act order is expected.")
        return per_expert[:, 0]

    def act_orders(self, g_idx: torch.Tensor, param: str, k: int, group: int, parts: int) -> torch.Tensor | None:
        """Each expert's permutation ``[E, K]`` that sorts its input rows by group (``g_idx [E * parts, K]``:
        :meth:`expert_g_idx`), or None where every expert's groups are already in order."""
        natural = torch.arange(k, device=g_idx.device) // group
        per_expert = self.expert_g_idx(g_idx, parts, k)
        if torch.equal(per_expert, natural.expand_as(per_expert)):
            return None
        perms = torch.argsort(per_expert, dim=1, stable=True)
        if not torch.equal(torch.gather(per_expert, 1, perms), natural.expand_as(per_expert)):
            raise ValueError(f"{self.config.name}: the experts' {param} g_idx does not put {group} input rows in "
                             "each group; its act order cannot be sorted into whole groups.")
        return perms

    @staticmethod
    def _store(block: nn.Module, param: str, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, rows: int,
               k: int, group: int) -> None:  # fmt: skip
        """Every expert's codes (``q [K, E * rows]``) in the int4 kernel layout ``[E, rows, K / 8]``, its scales
        and zero points ``[E, K / group, rows]``."""
        experts = q.shape[1] // rows
        words = torch.stack([pack_int4_kernel(q[:, e * rows: (e + 1) * rows]) for e in range(experts)])
        per_expert = (k // group, experts, rows)
        replace_parameter(block, param, words)
        replace_parameter(block, f"{param}_scale", scales.reshape(per_expert).transpose(0, 1).contiguous())
        replace_parameter(block, f"{param}_zeros",
                          zeros.to(scales.dtype).reshape(per_expert).transpose(0, 1).contiguous())

    def experts(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, ExpertQuant]:
        return block.w13, block.w2, ExpertQuant(block.w13_scale, block.w2_scale, None, block.w13_zeros,
                                                block.w2_zeros, block.w13_group, block.w2_group, block.w13_perm,
                                                block.w2_perm)
