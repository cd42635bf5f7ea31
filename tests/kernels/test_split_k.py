"""kernels/split_k.py: the tensor-core decode GEMMs add their K splits up in the kernel (the column block's last
program to arrive sums the fp32 partials and resets its arrival counter), so a split launch is one launch, its
result does not depend on which program finished last, and the next launch finds the counters at zero."""

from __future__ import annotations

import pytest
import torch

from kernels import split_k as split_k_module
from kernels.fp8_linear import fp8_linear_ref, fp8_mma_gemm, quantize_per_channel
from kernels.skinny_gemm import SkinnyConfig
from kernels.split_k import MAX_SPLIT_K, split_workspace, tensor_core_split_k
from tests.kernels.kernel_testing import INTERPRETED, KERNEL_DEVICE, assert_close, e4m3_grid_activations

# exact products under the interpreter; Hopper's fp8 wgmma accumulates with fewer than fp32's bits (~3e-4 seen)
TOLERANCE = 1e-5 if INTERPRETED else 1e-3


def _fp8_problem(m: int, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight, scale = quantize_per_channel(torch.randn(n, k, generator=gen) * 0.05)
    x = e4m3_grid_activations(m, k, gen, torch.float32)  # quantized exactly: the interpreter's fp8 cast is off
    return x.to(KERNEL_DEVICE), weight.to(KERNEL_DEVICE), scale.to(KERNEL_DEVICE)


def test_split_launches_reduce_in_the_kernel_and_leave_the_counters_at_zero():
    x, weight, scale = _fp8_problem(3, 130, 512, seed=1)  # three column blocks of 64, the last one ragged
    config = SkinnyConfig.parse("mma:64x64:w4:s1")
    first = fp8_mma_gemm(x, weight, scale, config, split_k=4)
    assert not split_k_module._counters[first.device].any()
    second = fp8_mma_gemm(x, weight, scale, config, split_k=4)  # the counters were reset: same answer again
    assert torch.equal(first, second)
    unsplit = fp8_mma_gemm(x, weight, scale, config, split_k=1)
    assert_close(first, unsplit.double(), TOLERANCE, "split against unsplit")
    assert_close(first, fp8_linear_ref(x.float().cpu(), weight.cpu(), scale.cpu()).double(), TOLERANCE, "split vs ref")


def test_the_most_splits_the_reduction_adds_up():
    x, weight, scale = _fp8_problem(2, 64, 16 * 64, seed=2)
    config = SkinnyConfig.parse("mma:64x64:w4:s1")
    out = fp8_mma_gemm(x, weight, scale, config, split_k=MAX_SPLIT_K.value)  # one 64-wide tile per split
    assert_close(out, fp8_linear_ref(x.float().cpu(), weight.cpu(), scale.cpu()).double(), TOLERANCE, "16 splits")
    with pytest.raises(ValueError, match="split_k must be 1 .. 16"):
        split_workspace(out, MAX_SPLIT_K.value + 1, 1)


def test_the_rule_and_pinned_splits_stay_within_the_reduction():
    """A tiny layer (SmolLM2's o_proj: 9 column blocks of 64) would take ~30 splits by the programs-per-SM rule."""
    assert tensor_core_split_k(576, 9216, SkinnyConfig.parse("mma:64x64:w4:s1"), None) == MAX_SPLIT_K.value
    assert tensor_core_split_k(576, 9216, SkinnyConfig.parse("mma:64x64:w4:s1:k32"), None) == MAX_SPLIT_K.value
    assert tensor_core_split_k(576, 9216, SkinnyConfig.parse("mma:64x64:w4:s1:k3"), None) == 3
