"""The fp8 KV cache read paths of the decode and prefill kernels (kernels/attention_common.py ``fp8_read_flags``):
fp16 dots with the V tile converted as packed pairs ("f16-vpairs", the default), fp16 dots with plain casts ("f16")
and the first path, tiles cast to q's dtype ("upcast"), each against the float64 reference on the dequantized cache.

Interpreted on CPU at small shapes. bf16 queries run here too on the fp16-dot paths: q is converted to fp16 before
any dot (the interpreter's bf16 ``tl.dot`` is what is wrong, not bf16 loads). The PTX conversion of the pairs
(``PAIRS_ASM``) only exists on the GPU: the interpreter splits the same uint16 pairs byte by byte, so the pair
indexing, join and reshape are what is checked here; the ``gpu`` test checks the instruction."""

from __future__ import annotations

import pytest
import torch

import kernels.decode_attention as decode_attention
from kernels.attention_common import FP8_KV_DTYPE, FP8_READ_PATHS, fp8_read_flags
from kernels.decode_attention import DecodeConfig, paged_decode_attention
from kernels.prefill_attention import PrefillConfig, paged_prefill_attention
from tests.kernels.kernel_testing import (
    ATTENTION_TOLERANCE, BF16, F16, F32, KERNEL_DEVICE, assert_close, poisoned_like,
)
from tests.kernels.test_kv_cache_fp8 import _fp8_problem, _reference

# (query dtype, read path): bf16 "upcast" would run a bf16 tl.dot (wrong when interpreted; the gpu test runs it);
# fp32 queries take the IEEE upcast path whatever the config says, so one fp32 case covers them.
INTERPRETED_CASES = [(F16, path) for path in FP8_READ_PATHS] + [(BF16, "f16-vpairs"), (BF16, "f16"), (F32, "f16-vpairs")]
if KERNEL_DEVICE == "cuda":
    INTERPRETED_CASES.append((BF16, "upcast"))


@pytest.mark.parametrize("dtype, path", INTERPRETED_CASES)
def test_decode_fp8_read_paths_match_reference(dtype, path):
    """Every read path, with scales that are not 1, unsplit and split (separate and fused merge)."""
    seq_lens = [1, 16, 33, 70, 47]
    problem, k64, v64 = _fp8_problem([1] * 5, seq_lens, (4, 2), 64, dtype, 21, 0.05, 4.0)
    ref = _reference(problem, k64, v64)
    for splits, fused in ((1, False), (3, True), (2, False)):
        out = poisoned_like(problem.q)
        paged_decode_attention(*problem.args(), out=out, num_splits=splits, k_scale=0.05, v_scale=4.0,
                               config=DecodeConfig(tile_n=16, order="seq", fused_reduce=fused, fp8_path=path))  # fmt: skip
        assert_close(out, ref, ATTENTION_TOLERANCE[dtype], f"{path} decode splits={splits} fused={fused}")


@pytest.mark.parametrize("dtype, path", INTERPRETED_CASES)
def test_prefill_fp8_read_paths_match_reference(dtype, path):
    """Unmasked and diagonal tiles, a decode row and a chunk after a cached prefix, two row-block sizes."""
    q_lens, seq_lens = [20, 1, 9], [20, 37, 30]
    problem, k64, v64 = _fp8_problem(q_lens, seq_lens, (4, 2), 64, dtype, 22, 0.5, 0.25)
    ref = _reference(problem, k64, v64)
    for block_m in (16, 32):
        out = poisoned_like(problem.q)
        paged_prefill_attention(*problem.args(), out=out, k_scale=0.5, v_scale=0.25,
                                config=PrefillConfig(block_m=block_m, tile_n=16, num_warps=4, num_stages=2,
                                                     fp8_path=path))  # fmt: skip
        assert_close(out, ref, ATTENTION_TOLERANCE[dtype], f"{path} prefill block_m={block_m}")


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_split_v_halves_match_reference(dtype):
    """``"f16-vsplit"`` at tiles of 32 and 64 keys (halves of 16 and 32: the split is taken; smaller tiles read V
    whole, as the parametrized tests above check): decode unsplit, split with a fused merge, with a window and
    soft-cap, and prefill's unmasked and diagonal tiles."""
    problem, k64, v64 = _fp8_problem([1] * 5, [1, 16, 33, 70, 47], (4, 2), 64, dtype, 21, 0.05, 4.0)
    ref = _reference(problem, k64, v64)
    for tile in (32, 64):
        for splits, fused in ((1, False), (3, True)):
            out = poisoned_like(problem.q)
            paged_decode_attention(*problem.args(), out=out, num_splits=splits, k_scale=0.05, v_scale=4.0,
                                   config=DecodeConfig(tile_n=tile, order="seq", fused_reduce=fused,
                                                       fp8_path="f16-vsplit", max_registers=128))  # fmt: skip
            assert_close(out, ref, ATTENTION_TOLERANCE[dtype], f"vsplit decode tile={tile} splits={splits}")
    features = dict(sliding_window=9, softcap=3.0)
    ref = _reference(problem, k64, v64, **features)
    out = poisoned_like(problem.q)
    paged_decode_attention(*problem.args(), out=out, num_splits=1, k_scale=0.05, v_scale=4.0, **features,
                           config=DecodeConfig(tile_n=32, fp8_path="f16-vsplit"))  # fmt: skip
    assert_close(out, ref, ATTENTION_TOLERANCE[dtype], "vsplit decode window + softcap")
    problem, k64, v64 = _fp8_problem([20, 1, 9], [20, 37, 30], (4, 2), 64, dtype, 22, 0.5, 0.25)
    ref = _reference(problem, k64, v64)
    out = poisoned_like(problem.q)
    paged_prefill_attention(*problem.args(), out=out, k_scale=0.5, v_scale=0.25,
                            config=PrefillConfig(block_m=16, tile_n=32, num_warps=4, num_stages=2, fp8_path="f16-vsplit"))  # fmt: skip
    assert_close(out, ref, ATTENTION_TOLERANCE[dtype], "vsplit prefill")


def test_pairs_path_with_padded_head_dim_window_and_softcap():
    """D=80 (a padded 128 block: the pairs are masked past 40) composes with the window and soft-cap."""
    features = dict(sliding_window=9, softcap=3.0)
    problem, k64, v64 = _fp8_problem([1, 1, 1], [30, 5, 41], (2, 1), 80, BF16, 23, 0.5, 0.125)
    ref = _reference(problem, k64, v64, **features)
    out = poisoned_like(problem.q)
    paged_decode_attention(*problem.args(), out=out, num_splits=1, k_scale=0.5, v_scale=0.125, **features,
                           config=DecodeConfig(tile_n=16, fp8_path="f16-vpairs"))  # fmt: skip
    assert_close(out, ref, ATTENTION_TOLERANCE[BF16], "fp8 pairs decode D=80")


@pytest.mark.parametrize("path", ["f16-vpairs", "f16"])
def test_bf16_queries_beyond_fp16_range_do_not_overflow(path):
    """bf16 queries whose elements exceed fp16's 65504 (here 3e5 on a dimension whose keys are zero, so the answer is
    an ordinary softmax): the fp16 conversion rescales the tile by a power of two and the score scale back, so the
    result is finite and right (a plain cast would make inf * 0 = NaN scores)."""
    for q_lens, seq_lens, decode in (([1, 1, 1], [40, 7, 65], True), ([12, 1], [30, 22], False)):
        problem, _, v64 = _fp8_problem(q_lens, seq_lens, (4, 2), 64, BF16, 24, 1.0, 1.0)
        problem.k_cache[..., 0] = 0.0
        problem.q[:, :, 0] = 3e5
        k64 = problem.k_cache.double()
        ref = _reference(problem, k64, v64)
        out = poisoned_like(problem.q)
        if decode:
            paged_decode_attention(*problem.args(), out=out, num_splits=1, config=DecodeConfig(tile_n=16, fp8_path=path))
        else:
            paged_prefill_attention(*problem.args(), out=out,
                                    config=PrefillConfig(block_m=16, tile_n=16, num_warps=4, num_stages=2, fp8_path=path))  # fmt: skip
        assert torch.isfinite(out).all()
        assert_close(out, ref, ATTENTION_TOLERANCE[BF16], f"{path} {'decode' if decode else 'prefill'} |q| = 3e5")


def test_fp8_read_flags():
    """Which constexprs a launch gets: fp16 dots only for an fp8 cache with fp16/bf16 queries; pairs need even V
    strides; the PTX conversion only on CUDA tensors; an unknown path is refused by name."""
    q = torch.zeros(2, 4, 64, dtype=BF16)
    fp8 = torch.zeros(3, 16, 2, 64, dtype=FP8_KV_DTYPE)
    assert fp8_read_flags(q, fp8, fp8, "f16-vpairs") == {"FP8_F16_DOTS": True, "V_PAIRS": True, "PAIRS_ASM": False,
                                                         "SPLIT_V": False}  # fmt: skip
    assert fp8_read_flags(q, fp8, fp8, "f16-vsplit") == {"FP8_F16_DOTS": True, "V_PAIRS": True, "PAIRS_ASM": False,
                                                         "SPLIT_V": True}  # fmt: skip
    assert fp8_read_flags(q, fp8, fp8, "f16") == {"FP8_F16_DOTS": True, "V_PAIRS": False, "PAIRS_ASM": False,
                                                  "SPLIT_V": False}  # fmt: skip
    assert not any(fp8_read_flags(q, fp8, fp8, "upcast").values())
    assert not any(fp8_read_flags(q.float(), fp8, fp8, "f16-vpairs").values())  # fp32 queries: the IEEE path
    bf16_cache = torch.zeros(3, 16, 2, 64, dtype=BF16)
    assert not any(fp8_read_flags(q, bf16_cache, bf16_cache, "f16-vpairs").values())
    odd = torch.zeros(3, 16, 2, 65, dtype=FP8_KV_DTYPE)[..., :64]  # odd strides: no uint16 view of the rows
    assert fp8_read_flags(q, fp8, odd, "f16-vpairs")["V_PAIRS"] is False
    assert not fp8_read_flags(q, fp8, odd, "f16-vsplit")["SPLIT_V"]  # the halves read pairs too
    with pytest.raises(ValueError, match="fp8 read path 'fp32'.*f16-vpairs"):
        fp8_read_flags(q, fp8, fp8, "fp32")


def test_odd_v_strides_fall_back_and_stay_correct():
    """A cache view with odd strides (not the engine's layout) takes the plain-cast path and still matches."""
    problem, k64, v64 = _fp8_problem([1, 1], [20, 33], (4, 2), 64, F16, 25, 1.0, 1.0)
    wide = torch.zeros(*problem.v_cache.shape[:3], 65, dtype=FP8_KV_DTYPE, device=problem.v_cache.device)
    wide[..., :64] = problem.v_cache
    problem.v_cache = wide[..., :64]
    wide_k = torch.zeros_like(wide)
    wide_k[..., :64] = problem.k_cache
    problem.k_cache = wide_k[..., :64]
    out = poisoned_like(problem.q)
    paged_decode_attention(*problem.args(), out=out, num_splits=1, config=DecodeConfig(tile_n=16))
    assert_close(out, _reference(problem, k64, v64), ATTENTION_TOLERANCE[F16], "odd strides")


def test_fp8_cache_uses_the_fp8_default_configs(monkeypatch):
    """Without a config, an fp8 cache launches with FP8_DECODE_CONFIG (split: FP8_SPLIT_DECODE_CONFIG), a 16-bit
    cache with DECODE_CONFIG: a bad fp8_path in the fp8 default is refused for the fp8 cache only."""
    bad = DecodeConfig(tile_n=16, order="seq", fp8_path="bogus")
    monkeypatch.setattr(decode_attention, "FP8_DECODE_CONFIG", bad)
    monkeypatch.setattr(decode_attention, "FP8_SPLIT_DECODE_CONFIG", bad)
    problem, _, _ = _fp8_problem([1, 1], [20, 33], (4, 2), 64, F16, 26, 1.0, 1.0)
    with pytest.raises(ValueError, match="bogus"):
        paged_decode_attention(*problem.args())
    plain = problem.q.new_zeros(problem.k_cache.shape).normal_()
    out = paged_decode_attention(problem.q, plain, plain.clone(), *problem.args()[3:])  # 16-bit cache: unaffected
    assert torch.isfinite(out).all()


def test_set_decode_configs_applies_to_fp8_unless_given():
    before = (decode_attention.DECODE_CONFIG, decode_attention.SPLIT_DECODE_CONFIG,
              decode_attention.FP8_DECODE_CONFIG, decode_attention.FP8_SPLIT_DECODE_CONFIG)  # fmt: skip
    try:
        a, b, c = DecodeConfig(tile_n=16), DecodeConfig(tile_n=32), DecodeConfig(tile_n=128)
        decode_attention.set_decode_configs(a, b)
        assert decode_attention.default_decode_configs(True) == (a, b)
        decode_attention.set_decode_configs(a, b, fp8_config=c)
        assert decode_attention.default_decode_configs(True) == (c, c)
        assert decode_attention.default_decode_configs(False) == (a, b)
    finally:
        decode_attention.set_decode_configs(before[0], before[1], fp8_config=before[2], fp8_split_config=before[3])
    assert decode_attention.FP8_DECODE_CONFIG is before[2]


@pytest.mark.gpu
@pytest.mark.parametrize("path", FP8_READ_PATHS)
@pytest.mark.parametrize("max_query_len", [1, None])
def test_gpu_fp8_read_paths_bf16_real_shapes(path, max_query_len):
    """bf16 queries at W2's head shapes on the GPU, each read path (the pairs through the PTX conversion)."""
    gen = torch.Generator().manual_seed(5)
    batch = 40
    seq_lens = torch.randint(1, 1200, (batch,), generator=gen).tolist()
    q_lens = [1] * batch if max_query_len == 1 else [min(s, n) for s, n in zip(seq_lens, [1, 7, 64, 300] * 10)]
    problem, k64, v64 = _fp8_problem(q_lens, seq_lens, (32, 8), 128, BF16, 6, 0.1, 0.2, device="cuda")
    ref = _reference(problem, k64, v64)
    out = poisoned_like(problem.q)
    if max_query_len == 1:
        paged_decode_attention(*problem.args(), out=out, k_scale=0.1, v_scale=0.2, config=DecodeConfig(fp8_path=path))
    else:
        paged_prefill_attention(*problem.args(), out=out, k_scale=0.1, v_scale=0.2,
                                config=PrefillConfig(block_m=64, tile_n=64, num_warps=4, num_stages=2, fp8_path=path))  # fmt: skip
    assert_close(out, ref, ATTENTION_TOLERANCE[BF16], f"fp8 {path} max_query_len={max_query_len}")


@pytest.mark.gpu
def test_gpu_split_v_with_register_cap_at_w1_shapes():
    """``"f16-vsplit"`` at 128 keys / 4 warps / 2 stages capped at 128 registers (the candidate that fits 4 programs
    per SM, attention_sass.py) against the reference at W1's head shapes."""
    gen = torch.Generator().manual_seed(7)
    seq_lens = torch.randint(1, 2000, (64,), generator=gen).tolist()
    problem, k64, v64 = _fp8_problem([1] * 64, seq_lens, (16, 8), 128, BF16, 8, 0.1, 0.2, device="cuda")
    out = poisoned_like(problem.q)
    paged_decode_attention(*problem.args(), out=out, k_scale=0.1, v_scale=0.2,
                           config=DecodeConfig(tile_n=128, num_warps=4, num_stages=2, fp8_path="f16-vsplit",
                                               max_registers=128))  # fmt: skip
    assert_close(out, _reference(problem, k64, v64), ATTENTION_TOLERANCE[BF16], "vsplit 128/4/2 maxnreg=128")
