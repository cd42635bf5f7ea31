"""Block-scaled fp8 weights (w8a16): the Triton kernel (interpreter on CPU) against the dequantize-then-matmul
reference, at decode and prefill row counts, with a ragged last block of rows and of columns, and scale blocks wider
than one K step; and the reference against a weight built from known blocks."""

from __future__ import annotations

import pytest
import torch

from kernels.fp8_block_gemm import (block_gemm_tiles, dequantize_fp8_blocks, fp8_block_gemm_triton, fp8_block_linear,
                                    fp8_block_linear_ref, quantize_fp8_blocks)
from tests.kernels.kernel_testing import KERNEL_DEVICE, TOLERANCE, assert_close


def test_dequantized_blocks_carry_their_own_scales():
    w = torch.cat([torch.full((2, 4), 1.0), torch.full((2, 4), 100.0)])  # two row blocks of very different ranges
    q, scale = quantize_fp8_blocks(w, (2, 4))
    assert scale.shape == (2, 1)
    torch.testing.assert_close(dequantize_fp8_blocks(q, scale, (2, 4)), w)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("shape, block", [((200, 384), (128, 128)), ((96, 160), (32, 64)), ((64, 256), (64, 256))],
                         ids=["ragged-rows", "small-blocks", "wide-k-block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_block_kernel_matches_reference(m, shape, block, dtype):
    gen = torch.Generator().manual_seed(m)
    n, k = shape
    q, scale = quantize_fp8_blocks(torch.randn(n, k, generator=gen) / k**0.5, block)
    x = torch.randn(m, k, generator=gen).to(dtype)
    q, scale, x = q.to(KERNEL_DEVICE), scale.to(KERNEL_DEVICE), x.to(KERNEL_DEVICE)
    out = fp8_block_gemm_triton(x, q, scale, block)
    assert out.shape == (m, n) and out.dtype == dtype
    ref = fp8_block_linear_ref(x.double(), q, scale, block)
    assert_close(out, ref, 4 * TOLERANCE[dtype], "fp8 block gemm")


def test_tiles_step_inside_one_scale_block():
    assert block_gemm_tiles(1, 128) == (16, 32, 128) and block_gemm_tiles(64, 64)[2] == 64
    assert block_gemm_tiles(300, 256)[2] == 64 and block_gemm_tiles(8, 32)[2] == 32


def test_dispatcher_on_cpu_takes_reference_and_adds_the_bias():
    q, scale = quantize_fp8_blocks(torch.randn(64, 64), (32, 32))
    x, bias = torch.randn(3, 64), torch.randn(64)
    torch.testing.assert_close(fp8_block_linear(x, q, scale, (32, 32), bias),
                               fp8_block_linear_ref(x, q, scale, (32, 32)) + bias)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 512])
def test_gpu_fp8_block_kernel_at_a_qwen3_8b_shape(m):
    """bf16 activations, 128 x 128 blocks, Qwen3-8B's gate_up (24576 x 4096)."""
    gen = torch.Generator().manual_seed(m)
    q, scale = quantize_fp8_blocks(torch.randn(24576, 4096, generator=gen) / 64, (128, 128))
    x = torch.randn(m, 4096, generator=gen).to(torch.bfloat16)
    out = fp8_block_linear(x.cuda(), q.cuda(), scale.cuda(), (128, 128))
    assert_close(out, fp8_block_linear_ref(x.double(), q, scale, (128, 128)), TOLERANCE[torch.bfloat16], "fp8 block")


def test_decode_launch_splits_k_when_the_rows_leave_sms_idle():
    """One decode row block: narrower output blocks, then K shared out (at most MAX_SPLIT_K ways, whole K steps);
    prefill keeps its tiles whole."""
    from kernels.fp8_block_gemm import decode_split
    from kernels.split_k import MAX_SPLIT_K

    cpu = torch.device("cpu")  # 132 SMs assumed without a GPU
    block_n, per_split, splits = decode_split(1, 4096, 4096, 32, 128, cpu)
    assert (block_n, splits) == (16, 1) and per_split == 4096  # 256 column blocks: every SM busy already
    block_n, per_split, splits = decode_split(1, 128, 8192, 32, 128, cpu)
    assert block_n == 16 and 1 < splits <= MAX_SPLIT_K.value and per_split % 128 == 0 and per_split * splits >= 8192
    assert decode_split(64, 128, 8192, 64, 64, cpu) == (64, 8192, 1)
