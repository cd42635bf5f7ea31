"""Linear and embedding layers whose parameters start uninitialized: the loader (or dummy init) fills them, so an
8B model is not initialized twice at startup."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.backend import check_backend
from kernels.skinny_gemm import linear


class Linear(nn.Module):
    """``y = x W^T + b``: decode-sized inputs (M <= 16 rows) take the Triton skinny GEMM, the rest cuBLAS
    (``backend="torch"``: always cuBLAS)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, backend: str = "auto") -> None:
        super().__init__()
        self.backend = check_backend(backend)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, backend=self.backend)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
