"""kernels/fp8_stream_k.py: the persistent W8A8 decode GEMM whose programs split ``column blocks x K tiles`` into
equal ranges. Column blocks shared by several programs are added up in the kernel by the last to arrive, so the
result is the same whatever the program count, and the arrival counters are back at zero after every launch."""

from __future__ import annotations

import pytest
import torch

from kernels import split_k as split_k_module
from kernels.fp8_linear import fp8_linear_ref, fp8_supported, quantize_activations, quantize_per_channel
from kernels.fp8_stream_k import fp8_stream_k_gemm, stream_k_programs
from kernels.split_k import MAX_SPLIT_K
from tests.kernels.kernel_testing import INTERPRETED, KERNEL_DEVICE, assert_close, e4m3_grid_activations

TOLERANCE = 1e-5 if INTERPRETED else 1e-3  # Hopper's fp8 wgmma accumulates with fewer bits than fp32


def _problem(m: int, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight, scale = quantize_per_channel(torch.randn(n, k, generator=gen) * 0.05)
    x = e4m3_grid_activations(m, k, gen, torch.float32)  # quantized exactly: the interpreter's fp8 cast is off
    xq, x_scale = quantize_activations(x)
    reference = fp8_linear_ref(x, weight, scale).double()
    device = KERNEL_DEVICE
    return xq.to(device), x_scale.to(device), weight.to(device), scale.to(device), reference


def _max_sharers(column_blocks: int, k_tiles: int, programs: int) -> int:
    total = column_blocks * k_tiles
    owner = [next(p for p in range(programs) if p * total // programs <= i < (p + 1) * total // programs)
             for i in range(total)]  # fmt: skip
    return max(len(set(owner[b * k_tiles:(b + 1) * k_tiles])) for b in range(column_blocks))


@pytest.mark.parametrize("m, n, k, programs", [
    (1, 256, 512, 5),  # ranges end inside column blocks: blocks shared by two programs
    (3, 200, 320, 7),  # ragged last column block and K tail
    (2, 128, 256, 1),  # one program walks everything
    (1, 192, 1024, 40),  # more programs than column blocks: each block shared by ~13
])  # fmt: skip
def test_stream_k_matches_the_w8a8_reference(m, n, k, programs):
    xq, x_scale, weight, scale, reference = _problem(m, n, k, seed=m + programs)
    out = fp8_stream_k_gemm(xq, x_scale, weight, scale, torch.float32, block_n=64, block_k=64, num_warps=4,
                            num_stages=2, programs=programs)  # fmt: skip
    assert_close(out, reference, TOLERANCE, f"stream-K m={m} n={n} k={k} programs={programs}")


def test_stream_k_result_does_not_depend_on_arrival_order_and_resets_the_counters():
    xq, x_scale, weight, scale, reference = _problem(2, 256, 512, seed=3)
    run = lambda programs: fp8_stream_k_gemm(xq, x_scale, weight, scale, torch.float32, block_n=64,  # noqa: E731
                                             block_k=64, num_warps=4, num_stages=2, programs=programs)
    first = run(6)
    assert not split_k_module._counters[first.device].any()
    assert torch.equal(first, run(6))
    assert_close(first, run(1).double(), TOLERANCE, "6 programs against 1")


def test_the_program_count_keeps_every_block_within_the_reduction():
    """Many programs on few K tiles would share a column block among more programs than the sum is unrolled for."""
    for column_blocks, k_tiles, asked in [(1, 64, 1000), (3, 16, 132), (96, 16, 264), (7, 5, 40), (2, 31, 99)]:
        programs = stream_k_programs(column_blocks, k_tiles, asked)
        assert 1 <= programs <= min(asked, column_blocks * k_tiles)
        assert _max_sharers(column_blocks, k_tiles, programs) <= MAX_SPLIT_K.value


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (4096 + 24, 4096 + 64)])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_stream_k_gpu_at_llama_shapes(m, n, k):
    if not fp8_supported(torch.device("cuda")):
        pytest.skip("needs fp8 tensor cores (compute capability 8.9+)")
    gen = torch.Generator().manual_seed(m)
    weight, scale = quantize_per_channel((torch.randn(n, k, generator=gen) * 0.02).cuda())
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    xq, x_scale = quantize_activations(x)
    reference = fp8_linear_ref(x, weight, scale).float()
    for block_n, block_k, stages, per_sm in [(64, 256, 4, 1), (128, 256, 3, 2), (128, 128, 6, 1)]:
        out = fp8_stream_k_gemm(xq, x_scale, weight, scale, torch.bfloat16, block_n=block_n, block_k=block_k,
                                num_warps=4, num_stages=stages, programs_per_sm=per_sm)  # fmt: skip
        assert_close(out, reference, 1e-2, f"stream-K gpu m={m} {n}x{k} {block_n}x{block_k} s{stages} g{per_sm}")


def test_decode_dispatch_runs_stream_k_where_the_table_says(monkeypatch):
    """An ``msk`` table entry sends that shape to the stream-K kernel, with the activations quantized by the
    dispatcher, by the caller upstream (``Fp8Activations``) or with the checkpoint's static scale."""
    from kernels import fp8_linear as fp8_module
    from kernels.fp8_linear import fp8_decode_gemm, pick_fp8_config, quantize_activations_triton
    from kernels.skinny_gemm import SkinnyConfig

    n, k = 96, 256
    config = SkinnyConfig.parse("msk:64x64:w4:s2:g1")
    monkeypatch.setitem(fp8_module.FP8_SKINNY_CONFIGS, (1, n, k), config)
    assert pick_fp8_config(1, n, k) == config
    gen = torch.Generator().manual_seed(9)
    weight, scale = quantize_per_channel(torch.randn(n, k, generator=gen) * 0.05)
    x = e4m3_grid_activations(1, k, gen, torch.float32)
    weight_d, scale_d, x_d = weight.to(KERNEL_DEVICE), scale.to(KERNEL_DEVICE), x.to(KERNEL_DEVICE)
    reference = fp8_linear_ref(x, weight, scale).double()
    assert_close(fp8_decode_gemm(x_d, weight_d, scale_d), reference, TOLERANCE, "msk, quantized by the dispatcher")
    quantized = quantize_activations_triton(x_d)
    assert_close(fp8_decode_gemm(x_d, weight_d, scale_d, quantized=quantized), reference, TOLERANCE, "msk, upstream")
    static = torch.tensor([2.0**-5])
    assert_close(fp8_decode_gemm(x_d, weight_d, scale_d, static.to(KERNEL_DEVICE)),
                 fp8_linear_ref(x, weight, scale, static).double(), TOLERANCE, "msk, static input scale")


def test_in_kernel_quantization_gives_the_quantize_kernels_bits():
    """``x_scale=None``: the kernel quantizes bf16 activations per token itself, exactly like
    ``quantize_activations_triton`` followed by the e4m3 launch."""
    from kernels.fp8_linear import quantize_activations_triton

    gen = torch.Generator().manual_seed(4)
    weight, scale = quantize_per_channel(torch.randn(200, 320, generator=gen) * 0.05)
    x = torch.randn(3, 320, generator=gen).to(KERNEL_DEVICE)
    weight, scale = weight.to(KERNEL_DEVICE), scale.to(KERNEL_DEVICE)
    kwargs = dict(block_n=64, block_k=64, num_warps=4, num_stages=2, programs=7)
    separate = fp8_stream_k_gemm(*quantize_activations_triton(x), weight, scale, torch.float32, **kwargs)
    assert torch.equal(fp8_stream_k_gemm(x, None, weight, scale, torch.float32, **kwargs), separate)
