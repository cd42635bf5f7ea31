"""FP8 (e4m3) W8A8 linear: ``out = (x quantized per token) @ (weight quantized per output channel)^T``.

The GEMM is ``torch._scaled_mm`` (cuBLASLt/CUTLASS row-wise scaling on Hopper and Ada): fp8 operands, one fp32
scale per activation row (dynamic per-token, or a static per-tensor scale broadcast) and one per weight row, bf16
output. ``fp8_linear_ref`` is the plain-torch reference with the same quantization of the activations (quantize,
dequantize, fp32 matmul): it runs on CPU and on GPUs without fp8 tensor cores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # an all-zero row still gets a finite scale


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` weight -> (fp8 weight, fp32 scale per output row), ``weight ~= q * scale[:, None]``."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_activations(x: torch.Tensor, static_scale: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``[M, K]`` activations -> (fp8 activations, fp32 ``[M, 1]`` scales): dynamic per-token, or ``static_scale``
    (a per-tensor scale from the checkpoint) for every row."""
    xf = x.float()
    if static_scale is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    else:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: quantize x like the GEMM path, dequantize both operands, fp32 matmul, x's dtype out."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, x_scale = quantize_activations(x2, input_scale)
    w = weight.float() * weight_scale.float().reshape(-1, 1)
    out = F.linear(xq.float() * x_scale, w, None if bias is None else bias.float())
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def fp8_supported(device: torch.device) -> bool:
    """fp8 tensor cores: compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(weight)^T + bias`` through ``torch._scaled_mm`` where fp8 tensor cores exist, else the reference.
    ``weight``: fp8 ``[N, K]`` (row-major, so ``weight.t()`` is the column-major operand cuBLASLt wants);
    ``weight_scale``: fp32 ``[N]``."""
    if not fp8_supported(x.device):
        return fp8_linear_ref(x, weight, weight_scale, input_scale, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*shape[:-1], weight.shape[0])
    xq, x_scale = quantize_activations(x2, input_scale)
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale.contiguous(), scale_b=weight_scale.reshape(1, -1),
                           out_dtype=torch.bfloat16)
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])
