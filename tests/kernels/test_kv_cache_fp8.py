"""FP8 (e4m3) KV cache in the kernels: the cache write quantizes with the layer's scales (reference and fused prep
kernel), values round-trip within e4m3 precision, and the decode and prefill kernels read fp8 caches (scales folded
into the scores and the output) as the float64 reference reads the dequantized cache. Interpreted on CPU at small
shapes (fp8 loads, stores and conversions work in the interpreter), fp32 and fp16 queries; bf16 on the GPU."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels.attention_common import FP8_E4M3_MAX, FP8_KV_DTYPE, dequantize_kv_ref, quantize_kv_ref
from kernels.attention_prep import _store_cache, attention_prep_ref, attention_prep_triton, write_kv_cache_ref
from kernels.decode_attention import DecodeConfig, paged_decode_attention
from kernels.paged_attention import paged_attention, paged_attention_ref
from kernels.prefill_attention import PrefillConfig, paged_prefill_attention
from tests.kernels.kernel_testing import (
    ATTENTION_TOLERANCE, BF16, F16, F32, KERNEL_DEVICE, assert_close, poisoned_like, seeded_attention_problem,
)
from tests.kernels.test_attention_prep import _case

# e4m3: 3 mantissa bits, so a normal value is off by at most half a unit in the last place, 2^-4 relative; below the
# smallest normal (2^-6) the spacing is fixed at 2^-9, so the absolute error is at most 2^-10 (times the scale).
E4M3_REL = 2.0**-4
E4M3_SUBNORMAL_ABS = 2.0**-10


def _assert_within_e4m3(restored: torch.Tensor, original: torch.Tensor, scale: float) -> None:
    original = original.double().clamp(-FP8_E4M3_MAX * scale, FP8_E4M3_MAX * scale)
    bound = torch.maximum(original.abs() * E4M3_REL, torch.full_like(original, E4M3_SUBNORMAL_ABS * scale))
    err = (restored.double() - original).abs()
    assert (err <= bound * (1 + 1e-6)).all(), f"max excess {(err - bound).max().item():.3e}"


@pytest.mark.parametrize("scale", [1.0, 0.02, 3.5])
def test_cache_write_round_trip_within_e4m3_precision(scale):
    """Reference cache write then read: every value back within e4m3's rounding; out-of-range values clamp to
    +-448 * scale instead of becoming NaN."""
    gen = torch.Generator().manual_seed(int(scale * 100))
    k = torch.randn(40, 2, 32, generator=gen) * 3 * scale
    v = torch.randn(40, 2, 32, generator=gen) * scale
    k[0, 0, :4] = torch.tensor([1e6, -1e6, 500.0, 0.0]) * scale  # clamped, clamped, clamped, exact zero
    caches = torch.zeros(2, 4, 16, 2, 32, dtype=FP8_KV_DTYPE)
    slots = torch.randperm(64, generator=gen)[:40]
    write_kv_cache_ref(k, v, caches[0], caches[1], slots, k_scale=scale, v_scale=scale)
    flat = caches.view(2, 64, 2, 32)[:, slots]
    k_back, v_back = dequantize_kv_ref(flat[0], scale, F32), dequantize_kv_ref(flat[1], scale, F32)
    assert torch.isfinite(k_back).all()
    _assert_within_e4m3(k_back, k, scale)
    _assert_within_e4m3(v_back, v, scale)
    assert k_back[0, 0, :4].tolist() == pytest.approx([448 * scale, -448 * scale, 448 * scale, 0.0])
    # the error is real (not a lossless path): e4m3 changes most random values
    assert (k_back != k).float().mean() > 0.5


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.25, 0.01)])
def test_prep_kernel_writes_fp8_like_the_reference(dtype, scales):
    """The fused RoPE + cache-write kernel quantizes as the reference does: values bit for bit, rotated keys within
    one e4m3 step (the rotation's float32 rounding may differ in the last bit before quantizing)."""
    k_scale, v_scale = scales
    positions, q, k, v, cache, kv, slots, _ = _case(29, 4, 2, 64, 16, dtype, KERNEL_DEVICE, 5, False)
    k, v = k * k_scale, v * (v_scale * 8)
    kv = torch.zeros(kv.shape, dtype=FP8_KV_DTYPE, device=KERNEL_DEVICE)
    expected = kv.clone()
    ref_q = attention_prep_ref(positions, q.clone(), k, v, cache, expected[0], expected[1], slots, None, None, 1e-6,
                               k_scale, v_scale)  # fmt: skip
    out = attention_prep_triton(positions, q, k, v, cache, kv[0], kv[1], slots, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(out, ref_q), "q is rotated as without fp8"
    assert torch.equal(kv[1].view(torch.uint8), expected[1].view(torch.uint8)), "values quantized bit for bit"
    k_out = dequantize_kv_ref(kv[0], k_scale, torch.float64)
    k_ref = dequantize_kv_ref(expected[0], k_scale, torch.float64)
    assert ((k_out - k_ref).abs() <= k_ref.abs() * 2 * E4M3_REL + E4M3_SUBNORMAL_ABS * k_scale).all()
    assert (kv[0].view(torch.uint8) == expected[0].view(torch.uint8)).float().mean() > 0.95


def _fp8_problem(q_lens, seq_lens, heads, head_dim, dtype, seed, k_scale, v_scale, device=KERNEL_DEVICE,
                 block_size=16):  # fmt: skip
    """A random problem whose caches are quantized to e4m3 with the scales; also returns the float64 dequantized
    caches the reference reads (the ground truth of an fp8 read)."""
    problem = seeded_attention_problem(q_lens, seq_lens, heads, head_dim, block_size, dtype, seed, device)
    k8 = quantize_kv_ref(problem.k_cache.float() * k_scale, k_scale, FP8_KV_DTYPE)
    v8 = quantize_kv_ref(problem.v_cache.float() * v_scale, v_scale, FP8_KV_DTYPE)
    problem.k_cache, problem.v_cache = k8, v8
    return problem, k8.double() * k_scale, v8.double() * v_scale


def _reference(problem, k64, v64, **features):
    p = problem
    return paged_attention_ref(p.q.double(), k64, v64, p.block_tables, p.seq_lens, p.query_start_loc, p.scale,
                               **features)  # fmt: skip


SCALES = [(1.0, 1.0), (0.05, 4.0)]


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("k_scale, v_scale", SCALES)
def test_decode_reads_fp8_cache(dtype, k_scale, v_scale):
    seq_lens = [1, 16, 33, 70]
    problem, k64, v64 = _fp8_problem([1] * 4, seq_lens, (4, 2), 64, dtype, 11, k_scale, v_scale)
    ref = _reference(problem, k64, v64)
    for splits, fused in ((1, False), (3, True), (3, False)):
        out = poisoned_like(problem.q)
        paged_decode_attention(*problem.args(), out=out, num_splits=splits, k_scale=k_scale, v_scale=v_scale,
                               config=DecodeConfig(tile_n=16, order="seq", fused_reduce=fused))  # fmt: skip
        assert_close(out, ref, ATTENTION_TOLERANCE[dtype], f"fp8 decode splits={splits} fused={fused}")


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("k_scale, v_scale", SCALES)
def test_prefill_reads_fp8_cache(dtype, k_scale, v_scale):
    q_lens, seq_lens = [20, 1, 9], [20, 37, 30]  # fresh prompt, decode row, chunk after a cached prefix
    problem, k64, v64 = _fp8_problem(q_lens, seq_lens, (4, 1), 64, dtype, 12, k_scale, v_scale)
    ref = _reference(problem, k64, v64)
    for block_m in (16, 64):
        out = poisoned_like(problem.q)
        paged_prefill_attention(*problem.args(), out=out, k_scale=k_scale, v_scale=v_scale,
                                config=PrefillConfig(block_m=block_m, tile_n=16, num_warps=4, num_stages=2))
        assert_close(out, ref, ATTENTION_TOLERANCE[dtype], f"fp8 prefill block_m={block_m}")


def test_fp8_with_head_dim_80_window_and_softcap():
    """fp8 composes with the padded head dim and the shared masks (decode and prefill)."""
    features = dict(sliding_window=9, softcap=3.0)
    problem, k64, v64 = _fp8_problem([1, 12, 1], [30, 25, 5], (2, 1), 80, F16, 13, 0.5, 0.125)
    ref = _reference(problem, k64, v64, **features)
    out = poisoned_like(problem.q)
    paged_prefill_attention(*problem.args(), out=out, k_scale=0.5, v_scale=0.125, **features,
                            config=PrefillConfig(block_m=16, tile_n=16, num_warps=4, num_stages=2))
    assert_close(out, ref, ATTENTION_TOLERANCE[F16], "fp8 prefill D=80")
    decode, k64, v64 = _fp8_problem([1, 1], [30, 5], (2, 1), 80, F16, 14, 0.5, 0.125)
    ref = _reference(decode, k64, v64, **features)
    out = poisoned_like(decode.q)
    paged_decode_attention(*decode.args(), out=out, num_splits=2, k_scale=0.5, v_scale=0.125, **features,
                           config=DecodeConfig(tile_n=16))
    assert_close(out, ref, ATTENTION_TOLERANCE[F16], "fp8 decode D=80")


def test_reference_reads_fp8_cache_with_its_scales():
    """The torch reference (the CPU path) dequantizes an fp8 cache with the scales; other caches ignore them."""
    problem, k64, v64 = _fp8_problem([3, 1], [10, 20], (2, 2), 32, F32, 15, 0.5, 2.0, device="cpu")
    ref = _reference(problem, k64, v64)
    out = paged_attention(*problem.args(), k_scale=0.5, v_scale=2.0, backend="torch")
    assert_close(out, ref, 1e-6, "reference on fp8")
    wrong = paged_attention(*problem.args(), backend="torch")  # scales 1: a different answer
    assert (wrong - out).abs().max() > 1e-2
    plain = seeded_attention_problem([3, 1], [10, 20], (2, 2), 32, 16, F32, 15, "cpu")
    assert torch.equal(paged_attention(*plain.args(), k_scale=7.0, v_scale=3.0, backend="torch"),
                       paged_attention(*plain.args(), backend="torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("max_query_len", [1, None])
def test_gpu_fp8_cache_bf16_real_shapes(max_query_len):
    """bf16 queries against an fp8 cache at Llama-8B head shapes, decode and prefill kernels, compiled."""
    gen = torch.Generator().manual_seed(3)
    batch = 48
    seq_lens = torch.randint(1, 1500, (batch,), generator=gen).tolist()
    q_lens = [1] * batch if max_query_len == 1 else [min(s, n) for s, n in zip(seq_lens, [1, 7, 64, 300] * 12)]
    problem, k64, v64 = _fp8_problem(q_lens, seq_lens, (32, 8), 128, BF16, 4, 0.1, 0.2, device="cuda")
    ref = _reference(problem, k64, v64)
    out = poisoned_like(problem.q)
    paged_attention(*problem.args(), max_query_len=max_query_len, out=out, k_scale=0.1, v_scale=0.2)
    assert_close(out, ref, ATTENTION_TOLERANCE[BF16], f"fp8 cache max_query_len={max_query_len}")


@triton.jit
def _store_fp8(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    _store_cache(y_ptr + offs, tl.load(x_ptr + offs), offs < N, 1.0, True)


def test_cache_store_rounds_like_torch_cast():
    """The write kernel's e4m3 rounding equals torch's cast bit for bit at every magnitude: subnormals, ties, carries
    into the next exponent (7.75 -> 8), clamping, signed zeros (the interpreter's own fp8 cast gets several wrong)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(512, generator=gen) * s for s in (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0)])
    edges = [7.5, 7.75, 8.5, 9.0, 0.015625, 0.0146484375, 0.0009765625, 0.0029296875, -7.75, 449.0, -460.0, -1e-4]
    x = torch.cat([x, torch.tensor(edges), torch.zeros(4096 - x.numel() - len(edges))]).to(KERNEL_DEVICE)
    y = torch.empty(4096, dtype=FP8_KV_DTYPE, device=KERNEL_DEVICE)
    _store_fp8[(1,)](x, y, N=4096)
    expected = x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)
    assert torch.equal(y.view(torch.uint8), expected.view(torch.uint8))
