"""The Gluon int4 decode GEMM (kernels/int4_gemv_gluon.py) against the dequantize-then-matmul reference, and the
rule for when it serves a call.

Gluon has no interpreter: the kernel tests are ``gpu`` tests; on the CPU the Triton int4 kernels run
(``test_int4_gemm.py``)."""

from __future__ import annotations

import pytest
import torch

from kernels import int4_gemm
from kernels.int4_gemm import int4_decode_or_prefill_gemm, int4_linear_ref, pack_int4_kernel
from kernels.int4_gemv_gluon import Int4GemvConfig, gluon_int4_gemv, int4_gemv_supported, preload_steps
from tests.kernels.kernel_testing import (FakeCudaTensor, assert_rope_cache_matches, relative_error,
                                          outputs_with_each_preload, rope_cache_problem)

BF16 = torch.bfloat16


def test_gemv_is_declined_on_cpu():
    x = torch.zeros(1, 256, dtype=BF16)
    qweight = torch.zeros(32, 32, dtype=torch.int32)
    assert not int4_gemv_supported(x, qweight, 128)


@pytest.mark.parametrize("hip, capability, rows, k, group, dtype, served", [
    (None, (9, 0), 1, 4096, 128, BF16, True), (None, (8, 0), 8, 4096, 256, torch.float16, True),
    (None, (9, 0), 9, 4096, 128, BF16, False),  # more rows than the mma's N
    (None, (9, 0), 1, 4160, 64, BF16, False),  # group 64: a 128-k chunk would span two scales
    (None, (9, 0), 1, 4096, 128, torch.float32, False), (None, (7, 5), 1, 4096, 128, BF16, False),
    ("6.2", (9, 4), 1, 4096, 128, BF16, False),
])  # fmt: skip
def test_gemv_device_and_shape_rule(monkeypatch, hip, capability, rows, k, group, dtype, served):
    """Compute capability 8+ and not ROCm, fp16 / bf16 x of at most 8 rows, K and the group multiples of 128."""
    import kernels.int4_gemv_gluon as gemv_module

    monkeypatch.setattr(gemv_module, "HAS_GLUON", True)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    gemv_module._has_bf16_mma.cache_clear()  # asked once per device: forget the real (or last) answer
    try:
        assert int4_gemv_supported(FakeCudaTensor((rows, k), dtype), FakeCudaTensor((4096, k // 8), torch.int32),
                                   group) is served
    finally:
        gemv_module._has_bf16_mma.cache_clear()


@pytest.mark.parametrize("config, k, pdl, expected", [
    (Int4GemvConfig(4, 2, preload=1), 4096, True, 1), (Int4GemvConfig(4, 2, preload=2), 4096, True, 2),
    (Int4GemvConfig(8, 4, preload=2), 4096, True, 1),  # one step is the whole row
    (Int4GemvConfig(4, 2, preload=2), 4224, True, 0),  # K not whole steps
    (Int4GemvConfig(4, 2, preload=2), 4096, False, 0),  # no PDL: nothing to overlap
])  # fmt: skip
def test_preload_rule(config, k, pdl, expected):
    assert preload_steps(config, k, pdl) == expected


def _problem(m: int, n: int, k: int, group: int, dtype=BF16, seed: int = 0):
    """Random codes, zero points 0..15 and scales in the kernel layout, and bf16 / fp16 rows."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), device="cuda", generator=gen)
    scales = (torch.rand(k // group, n, device="cuda", generator=gen) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (k // group, n), device="cuda", generator=gen).to(dtype)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    return x, pack_int4_kernel(codes), scales, zeros


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("n, k, group", [(6144, 4096, 128), (4096, 14336, 128), (100, 4096, 128),
                                         (48, 1152, 128), (256, 2048, 256), (96, 3072, 1024)])
@pytest.mark.parametrize("config", [Int4GemvConfig(4, 1), Int4GemvConfig(4, 2), Int4GemvConfig(8, 4),
                                    Int4GemvConfig(8, 2, preload=2)], ids=repr)
def test_gpu_gemv_matches_reference(m, n, k, group, config):
    """Row tails (N not a multiple of 16), K not whole steps (1152, 3072 at 4 KB steps), groups over several
    chunks (256, 1024)."""
    x, qweight, scales, zeros = _problem(m, n, k, group)
    out = gluon_int4_gemv(x, qweight, scales, zeros, group, config)
    assert out.shape == (m, n) and out.dtype == BF16
    assert relative_error(out, int4_linear_ref(x, qweight, scales, zeros, group)) < 4e-3


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
def test_gpu_gemv_fp16(m):
    x, qweight, scales, zeros = _problem(m, 1024, 4096, 128, dtype=torch.float16, seed=1)
    out = gluon_int4_gemv(x, qweight, scales, zeros, 128, Int4GemvConfig(4, 2))
    assert out.dtype == torch.float16
    assert relative_error(out, int4_linear_ref(x, qweight, scales, zeros, 128)) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("n, k, config", [(6144, 4096, Int4GemvConfig(4, 2)), (4096, 14336, Int4GemvConfig(8, 2)),
                                          (100, 2048, Int4GemvConfig(4, 1)), (256, 1152, Int4GemvConfig(4, 2))],
                         ids=str)
def test_gpu_gemv_preload_changes_no_bit_in_a_cuda_graph(n, k, config):
    """Steps of weight loaded before the PDL wait (and multiplied after it) give the loop's bits exactly, in a CUDA
    graph behind the kernel that writes x."""
    x, qweight, scales, zeros = _problem(3, n, k, 128, seed=2)
    src = torch.randn_like(x)

    def step(cfg: Int4GemvConfig) -> torch.Tensor:
        x.copy_(src * 2.0)
        return gluon_int4_gemv(x, qweight, scales, zeros, 128, cfg)

    outs = outputs_with_each_preload(config, step)
    assert relative_error(outs[0], int4_linear_ref(src * 2.0, qweight, scales, zeros, 128)) < 4e-3
    assert all(torch.equal(outs[0], out) for out in outs[1:])


@pytest.mark.gpu
def test_gpu_decode_dispatch_takes_the_gemv_and_keeps_fractional_zeros_on_triton(monkeypatch):
    """``int4_decode_or_prefill_gemm`` serves M <= 8 with whole-number zeros through the GEMV, and zero points that
    are not whole numbers (GGUF Q4_1) through the Triton kernel's fractional path, both against the reference."""
    x, qweight, scales, zeros = _problem(2, 512, 4096, 128, seed=3)
    calls = []
    real = int4_gemm.gluon_int4_gemv
    monkeypatch.setattr(int4_gemm, "gluon_int4_gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = int4_decode_or_prefill_gemm(x, qweight, scales, zeros, 128)
    assert calls and relative_error(out, int4_linear_ref(x, qweight, scales, zeros, 128)) < 4e-3
    calls.clear()
    fractional = zeros + 0.25
    out = int4_decode_or_prefill_gemm(x, qweight, scales, fractional, 128, integer_zeros=False)
    assert not calls and relative_error(out, int4_linear_ref(x, qweight, scales, fractional, 128)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(32, 8, 128), (8, 2, 64)])
@pytest.mark.parametrize("config", [Int4GemvConfig(8, 1), Int4GemvConfig(4, 2, 2)], ids=repr)
def test_gpu_gemv_rope_cache_matches_projection_then_prep(m, num_heads, num_kv_heads, head_dim, config):
    """The int4 qkv GEMV with the prep in its epilogue against the GEMV and then the prep kernel: the same q, the
    same keys and values in the batch's cache slots (a padding token's slot -1 writes nothing), the rest of the
    cache untouched."""
    from kernels.attention_prep import attention_prep_triton
    from kernels.int4_gemv_gluon import gluon_int4_gemv_rope_cache

    q_rows, kv_rows = num_heads * head_dim, num_kv_heads * head_dim
    x, qweight, scales, zeros = _problem(m, q_rows + 2 * kv_rows, 2048, 128, seed=5)
    cos_sin, positions, slots, caches = rope_cache_problem(m, num_kv_heads, head_dim, seed=6)
    fused_caches = [c.clone() for c in caches]
    qkv = gluon_int4_gemv(x, qweight, scales, zeros, 128, config)
    q, k, v = qkv.split([q_rows, kv_rows, kv_rows], dim=-1)
    q = attention_prep_triton(positions, q.reshape(m, num_heads, head_dim), k.reshape(m, num_kv_heads, head_dim),
                              v.reshape(m, num_kv_heads, head_dim), cos_sin, *caches, slots)  # fmt: skip
    fused_q = gluon_int4_gemv_rope_cache(x, qweight, scales, zeros, 128, positions, cos_sin, *fused_caches, slots,
                                         q_rows, kv_rows, head_dim, config)  # fmt: skip
    assert_rope_cache_matches(fused_q, q, fused_caches, caches, slots)
