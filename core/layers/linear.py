"""Linear and embedding layers whose parameters start uninitialized: the loader (or dummy init) fills them, so an
8B model is not initialized twice at startup."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kernels.backend import check_backend
from kernels.fp8_linear import Fp8Activations, NormedRows
from kernels.skinny_gemm import linear

if TYPE_CHECKING:
    from core.config import ModelConfig
    from core.layers.quantization.base import LinearMethod


class Linear(nn.Module):
    """``y = x W^T + b``: decode-sized inputs (M <= 16 rows) take the Triton skinny GEMM, the rest cuBLAS
    (``backend="torch"``: always cuBLAS). With a ``quant_method`` (core/layers/quantization) the method owns the
    weight's storage and the matmul; ``output_sizes`` are the merged shards (q, k, v) it may scale separately."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, backend: str = "auto",
                 quant_method: LinearMethod | None = None, output_sizes: Sequence[int] | None = None) -> None:
        super().__init__()
        self.backend = check_backend(backend)
        self.in_features, self.out_features = in_features, out_features
        self.quant_method = quant_method
        if quant_method is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        else:
            sizes = tuple(output_sizes) if output_sizes is not None else (out_features,)
            if sum(sizes) != out_features:
                raise ValueError(f"output_sizes {sizes} do not add up to out_features={out_features}.")
            quant_method.create_weights(self, in_features, sizes, torch.get_default_dtype())
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor | Fp8Activations) -> torch.Tensor:
        """``x`` may come with its fp8 quantization (``Fp8Activations``, from ``RMSNorm(..., quantize_fp8=True)``):
        a W8A8 fp8 layer reads that, any other layer ``x.x``."""
        if isinstance(x, Fp8Activations):
            if self.quant_method is not None:
                return self.quant_method.apply_fp8_activations(self, x, self.bias)
            x = x.x
        if self.quant_method is None:
            return linear(x, self.weight, self.bias, backend=self.backend)
        return self.quant_method.apply(self, x, self.bias)

    def may_rope_cache(self, x: torch.Tensor | Fp8Activations) -> bool:
        """Whether :meth:`rope_cache_forward` can serve ``x`` at all: a method with such a kernel and rows that come
        quantized. Cheap, so a caller can skip building the kernel's inputs."""
        return self.quant_method is not None and self.quant_method.may_rope_cache(self, x)

    def rope_cache_forward(self, x: torch.Tensor | Fp8Activations, **rope) -> torch.Tensor | None:
        """A qkv projection fused with the attention prep (rotary, cache write; see
        ``PagedAttention.fused_qkv_prep``): q ready for attention, or None where this layer's method has no such
        kernel for ``x`` (then call the layer and the prep)."""
        if not self.may_rope_cache(x):
            return None
        return self.quant_method.apply_rope_cache(self, x, **rope)

    def may_norm_rows(self) -> bool:
        """Whether this layer's kernel may apply the RMSNorm before it itself (``NormedRows``; see the method's)."""
        return self.quant_method is not None and self.quant_method.may_norm_rows(self)

    def silu_and_mul_forward(self, x: torch.Tensor | Fp8Activations | NormedRows,
                             down: Linear) -> torch.Tensor | None:  # fmt: skip
        """``silu_and_mul(self(x))`` (a ``[gate | up]`` projection) in this layer's GEMM launch, or None where its
        method has no such kernel for ``x`` and the ``down`` layer after it (then call the layer and the
        activation)."""
        if self.quant_method is None:
            return None
        return self.quant_method.apply_silu_and_mul(self, x, down)

    def takes_fp8_activations(self) -> bool:
        """Whether this layer's quantization method reads upstream fp8 activations (see ``forward``)."""
        return self.quant_method is not None and self.quant_method.takes_fp8_activations(self)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def token_embedding(cfg: ModelConfig, backend: str) -> nn.Module:
    """The model's token embedding: an ``Embedding``, or the table its quantization keeps (GGUF: in its blocks)."""
    quantized = getattr(cfg.quantization, "embedding", None)
    return (quantized and quantized(cfg.vocab_size, cfg.hidden_size, backend)) or Embedding(cfg.vocab_size,
                                                                                             cfg.hidden_size)


class QuantizedLMHead(Linear):
    """An untied LM head its checkpoint quantized (GPTQ's ``lm_head: true``, compressed-tensors): the method's
    product in the activations' dtype, upcast to fp32 logits (vLLM's quantized heads do the same)."""

    def __init__(self, hidden_size: int, vocab_size: int, backend: str, quant_method: LinearMethod) -> None:
        super().__init__(hidden_size, vocab_size, backend=backend, quant_method=quant_method)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self(hidden).float()


def lm_head(cfg: ModelConfig, embedding: nn.Module, backend: str) -> nn.Module:
    """The LM head: the embedding when tied, else the head its quantization keeps (GGUF's blocks, a quantized
    checkpoint's layer), else a ``Linear``."""
    if cfg.tie_word_embeddings:
        return embedding
    quantized = getattr(cfg.quantization, "lm_head", None)
    return (quantized and quantized(cfg.hidden_size, cfg.vocab_size, backend)) or Linear(
        cfg.hidden_size, cfg.vocab_size, backend=backend)


def head_logits(head: nn.Module, hidden: torch.Tensor, backend: str) -> torch.Tensor:
    """fp32 logits in one pass: the head's own ``compute_logits`` (kept in GGUF blocks), else the skinny GEMM."""
    if hasattr(head, "compute_logits"):
        return head.compute_logits(hidden)
    return linear(hidden, head.weight, out_dtype=torch.float32, backend=backend)
