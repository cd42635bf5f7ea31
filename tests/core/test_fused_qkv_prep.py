"""``PagedAttention.fused_qkv_prep``: which projections it asks for the fused qkv + prep kernel, and that it builds
that kernel's inputs (a longrope model's table positions are a few kernels per layer) only for those."""

from __future__ import annotations

import torch

from core.layers.attention import AttentionMetadata, PagedAttention
from core.layers.linear import Linear
from core.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod
from core.layers.quantization.int4 import AWQConfig, Int4LinearMethod
from core.layers.rotary import RotaryEmbedding
from kernels.fp8_linear import Fp8Activations

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32


def _attention(table_calls: list) -> PagedAttention:
    rotary = RotaryEmbedding(HEAD_DIM, 64, 10000.0, None)
    real = rotary.table_positions
    rotary.table_positions = lambda *a: table_calls.append(1) or real(*a)
    return PagedAttention(HEADS, KV_HEADS, HEAD_DIM, rotary, kernel_backend="triton")


def _meta() -> AttentionMetadata:
    return AttentionMetadata(slot_mapping=torch.zeros(1, dtype=torch.long), block_tables=torch.zeros(1, 1),
                             seq_lens=torch.ones(1, dtype=torch.int32),
                             query_start_loc=torch.tensor([0, 1], dtype=torch.int32), max_query_len=1)  # fmt: skip


def _qkv(quant_method=None) -> Linear:
    return Linear(128, (HEADS + 2 * KV_HEADS) * HEAD_DIM, quant_method=quant_method)


def test_a_projection_without_the_fused_kernel_is_not_asked_and_builds_nothing():
    calls = []
    attention = _attention(calls)
    x = torch.zeros(1, 128)
    fp8_rows = Fp8Activations(x, x.to(torch.float8_e4m3fn), torch.ones(1, 1))
    kv_cache = torch.zeros(2, 1, 16, KV_HEADS, HEAD_DIM)
    int4 = Int4LinearMethod(AWQConfig(group_size=128, zero_point=True))  # its fused kernel needs CUDA rows
    for qkv, rows in ((_qkv(), x), (_qkv(), fp8_rows), (_qkv(Fp8LinearMethod(Fp8Config.online())), x),
                      (_qkv(int4), x)):
        assert not qkv.may_rope_cache(rows)
        assert attention.fused_qkv_prep(qkv, rows, torch.zeros(1, dtype=torch.long), kv_cache, _meta()) is None
    assert calls == []


def test_an_fp8_projection_with_quantized_rows_is_asked():
    calls = []
    attention = _attention(calls)
    qkv = _qkv(Fp8LinearMethod(Fp8Config.online()))
    x = torch.zeros(1, 128)
    fp8_rows = Fp8Activations(x, x.to(torch.float8_e4m3fn), torch.ones(1, 1))
    asked = []
    qkv.rope_cache_forward = lambda rows, **rope: asked.append(sorted(rope)) or None  # the kernel declines (CPU)
    assert qkv.may_rope_cache(fp8_rows)
    kv_cache = torch.zeros(2, 1, 16, KV_HEADS, HEAD_DIM)
    assert attention.fused_qkv_prep(qkv, fp8_rows, torch.zeros(1, dtype=torch.long), kv_cache, _meta()) is None
    assert calls == [1] and asked == [["cos_sin_cache", "head_dim", "k_cache", "kv_rows", "positions", "q_rows",
                                       "slot_mapping", "v_cache"]]
