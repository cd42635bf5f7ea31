"""Encoder models of the BERT family: BERT (absolute positions, token types, post-LayerNorm, GELU) and RoBERTa /
XLM-R (the same, with positions offset past the padding id). Bidirectional attention over sequences packed back to
back (``kernels/encoder_attention.py``); no KV cache: one forward over whole prompts gives the hidden states that
``core/pooling.py`` turns into embeddings.

Single-segment inputs only: every token has token type 0 (what an embeddings request is). The pooler head and any
MLM head in a checkpoint are not loaded: sentence-transformers pooling reads the last hidden states.

The attention backend (kernels/backend.py) is given at construction, as for the decoders, and handed to every
layer's attention call. Linears, LayerNorms and GELU are torch's own: no other kernel of ours runs here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from core.config import ENCODER_ARCHITECTURES
from kernels.backend import check_backend, resolve_backends
from kernels.encoder_attention import encoder_attention

_HEAD_PREFIXES = ("pooler.", "cls.", "lm_head.")  # heads embeddings do not use
_ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass(frozen=True)
class BertConfig:
    architecture: str
    family: str  # bert | roberta
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    position_offset: int  # RoBERTa: positions start at pad_token_id + 1
    torch_dtype: str | None
    is_matryoshka: bool
    matryoshka_dimensions: tuple[int, ...] | None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_model_len(self) -> int:
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "BertConfig":
        arch = next(a for a in d.get("architectures") or [] if a in ENCODER_ARCHITECTURES)
        family = ENCODER_ARCHITECTURES[arch]
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"Unsupported position_embedding_type '{d['position_embedding_type']}' for {arch}; "
                             "only absolute position embeddings are implemented.")
        act = d.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"Unsupported hidden_act '{act}' for {arch}; supported: {sorted(_ACTIVATIONS)}.")
        dims = d.get("matryoshka_dimensions")
        return cls(
            architecture=arch, family=family, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"], max_position_embeddings=d.get("max_position_embeddings", 512),
            type_vocab_size=d.get("type_vocab_size", 2), layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            hidden_act=act, position_offset=(d.get("pad_token_id", 1) + 1) if family == "roberta" else 0,
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            is_matryoshka=bool(d.get("is_matryoshka") or dims), matryoshka_dimensions=tuple(dims) if dims else None,
        )


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig, attention_backend: str) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.attention_backend = check_backend(attention_backend, "attention backend")
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(h, 3 * h)  # query/key/value merged: one GEMM
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(h, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, h)
        self.output_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        q, k, v = self.qkv(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        attn = encoder_attention(q, k, v, cu_seqlens, max_seq_len, self.head_dim**-0.5,
                                 backend=self.attention_backend)
        x = self.attn_norm(x + self.attn_out(attn.reshape(x.shape)))
        return self.output_norm(x + self.output(self.act(self.intermediate(x))))


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig, *, attention_backend: str = "auto", kernel_backend: str = "auto") -> None:
        """``attention_backend`` / ``kernel_backend``: "auto", "triton" or "torch", as for the decoders; a "torch"
        kernel backend puts attention on its reference too (the only kernel of ours an encoder runs)."""
        super().__init__()
        self.config = cfg
        self.attention_backend, self.kernel_backend = resolve_backends(attention_backend, kernel_backend)
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg, self.attention_backend) for _ in range(cfg.num_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seq_len: int) -> torch.Tensor:
        """Packed tokens [T] with their in-sequence positions [T] -> last hidden states [T, H]."""
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions + self.config.position_offset)
             + self.token_type_embeddings.weight[0])
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seq_len)
        return x

    # ------------------------------------------------------------------------------------------------ weights
    _RENAMES = (
        ("embeddings.word_embeddings.", "word_embeddings."),
        ("embeddings.position_embeddings.", "position_embeddings."),
        ("embeddings.token_type_embeddings.", "token_type_embeddings."),
        ("embeddings.LayerNorm.", "embed_norm."),
        ("attention.output.dense.", "attn_out."),
        ("attention.output.LayerNorm.", "attn_norm."),
        ("intermediate.dense.", "intermediate."),
        ("output.dense.", "output."),
        ("output.LayerNorm.", "output_norm."),
        ("encoder.layer.", "layers."),
    )
    _QKV = {"attention.self.query.": 0, "attention.self.key.": 1, "attention.self.value.": 2}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF-named tensors (with or without the ``bert.`` / ``roberta.`` prefix) into our parameters; raises on an
        unknown tensor, a shape mismatch, or a parameter left unfilled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        prefix = self.config.family + "."
        h = self.config.hidden_size
        for name, tensor in weights:
            if name.startswith(prefix):
                name = name[len(prefix):]
            if name.startswith(_HEAD_PREFIXES) or name.endswith(("position_ids", "token_type_ids")):
                continue
            target, rows = name, None
            for hf, index in self._QKV.items():
                if hf in target:
                    target = target.replace(hf, "qkv.")
                    rows = (index * h, h)
            for hf, ours in self._RENAMES:
                target = target.replace(hf, ours)
            if target not in params:
                raise ValueError(f"Checkpoint tensor '{name}' has no place in {self.config.architecture}.")
            dest = params[target].data if rows is None else params[target].data[rows[0] : rows[0] + rows[1]]
            if dest.shape != tensor.shape:
                raise ValueError(f"Shape mismatch for '{name}': checkpoint {tuple(tensor.shape)}, "
                                 f"model {tuple(dest.shape)}.")
            dest.copy_(tensor)
            loaded.add(target if rows is None else f"{target}[{rows[0]}]")
        expected = set()
        for pname in params:
            if ".qkv." in pname:
                expected.update(f"{pname}[{i * h}]" for i in range(3))
            else:
                expected.add(pname)
        missing = expected - loaded
        if missing:
            raise ValueError(f"Checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:5]}.")

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights for benchmarks: small normal, norms at one."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, param in self.named_parameters():
            if "norm" in name:
                param.data.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.data.copy_(torch.randn(param.shape, generator=gen) * 0.02)
