"""``--quantization experts_int8`` (vLLM's): a 16-bit mixture-of-experts checkpoint's experts quantized at load to
int8 with one scale per expert and output channel (symmetric, round to nearest), run w8a16 on the fused MoE kernel's
8-bit experts (``kernels/fused_moe.py: ExpertQuant.w13_int8``); every other layer stays 16-bit. The experts are most
of a MoE model's bytes (Mixtral-8x7B: 96%, Qwen3-30B-A3B: 95%), so this nearly halves its memory and what a decode
step reads, with 8-bit weights' small error (no activation quantization).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.layers.quantization.base import LinearMethod, QuantConfig, replace_parameter
from kernels.fused_moe import ExpertQuant
from kernels.int8_gemm import quantize_int8_rows


class ExpertsInt8Config(QuantConfig):
    """The online method: no checkpoint layout of its own, the experts quantized after loading."""

    name = "experts_int8"

    @classmethod
    def from_hf(cls, quantization_config: dict[str, Any]) -> ExpertsInt8Config:
        raise ValueError("experts_int8 quantizes a 16-bit checkpoint's experts at load (--quantization experts_int8); "
                         "checkpoints are not stored in it.")

    @classmethod
    def online(cls) -> ExpertsInt8Config:
        return cls()

    def linear_method(self, prefix: str) -> LinearMethod | None:
        return None  # attention, dense MLPs, shared experts and the router stay 16-bit

    def moe_method(self, prefix: str) -> ExpertsInt8MoEMethod:
        return ExpertsInt8MoEMethod()

    def summary(self) -> str:
        return "experts_int8 (experts in int8 per channel at load, w8a16; other layers 16-bit)"


class ExpertsInt8MoEMethod:
    """The block's own 16-bit ``w13`` / ``w2`` load, then become int8 codes ``[E, N, K]`` with fp32 scales ``[E, 1,
    N]`` (``absmax / 127`` per output channel: the 8-bit experts' one group over K)."""

    def create_weights(self, block: nn.Module) -> bool:
        for name, k in (("w13", block.hidden), ("w2", block.inter)):
            if k % 16:
                raise ValueError(f"experts_int8: an expert's {name} input size {k} (this rank's, under tensor "
                                 "parallelism) is not a multiple of the 8-bit experts' 16-input steps.")
        return False  # the 16-bit stacks load as they would unquantized

    def process_weights_after_loading(self, block: nn.Module) -> None:
        experts = block.num_experts
        for name, k in (("w13", block.hidden), ("w2", block.inter)):
            weight = getattr(block, name).data.view(experts, -1, k)
            codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
            scales = torch.empty(experts, 1, weight.shape[1], dtype=torch.float32, device=weight.device)
            for e in range(experts):  # one expert at a time: its fp32 copy stays small
                codes[e], absmax = quantize_int8_rows(weight[e])
                scales[e, 0] = absmax / 127.0
            replace_parameter(block, name, codes)
            replace_parameter(block, f"{name}_scale", scales)

    def experts(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, ExpertQuant]:
        return block.w13, block.w2, ExpertQuant(block.w13_scale, block.w2_scale, w13_group=block.hidden,
                                                w2_group=block.inter, w13_int8=True, w2_int8=True)
