"""bitsandbytes 4-bit weights: the Triton kernel (interpreter on CPU) against the dequantize-then-matmul reference
at decode and prefill row counts, NF4 and FP4 codebooks, blocks of 64 and 128; the packing's nibble order and the
quantizer's nearest-code rounding."""

from __future__ import annotations

import pytest
import torch

from kernels.bnb4_gemm import (E2M1_CODEBOOK, NF4_CODEBOOK, bnb4_gemm_triton, bnb4_linear, bnb4_linear_ref,
                               dequantize_bnb4, pack_codes, quantize_bnb4, unpack_codes)
from tests.kernels.kernel_testing import KERNEL_DEVICE, TOLERANCE, assert_close

FP4_CODEBOOK = (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204,
                0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5,
                -0.1666666716337204, -0.25)  # fmt: skip


def test_a_byte_holds_two_codes_high_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]])
    assert pack_codes(codes).tolist() == [[0x12, 0xF0]]
    assert torch.equal(unpack_codes(pack_codes(codes)), codes)


def test_quantizer_rounds_each_value_to_its_blocks_nearest_code():
    w = torch.tensor([[1.0, -0.5, 0.0, 2.0] * 16])  # one block of 64, absmax 2
    packed, absmax = quantize_bnb4(w)
    assert absmax.tolist() == [[2.0]]
    deq = dequantize_bnb4(packed, absmax, torch.tensor(NF4_CODEBOOK), 64)
    assert deq[0, :4].tolist() == pytest.approx([2 * 0.44070982933044434, -2 * 0.28444138169288635, 0.0, 2.0])


@pytest.mark.parametrize("m", [1, 7, 40])
@pytest.mark.parametrize("codebook, blocksize", [(NF4_CODEBOOK, 64), (FP4_CODEBOOK, 64), (NF4_CODEBOOK, 128),
                                                (E2M1_CODEBOOK, 16)],
                         ids=["nf4", "fp4", "nf4-block128", "nvfp4-block16"])  # NVFP4: two blocks a K step
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bnb4_kernel_matches_reference(m, codebook, blocksize, dtype):
    gen = torch.Generator().manual_seed(m)
    n, k = 96, 256
    packed, absmax = quantize_bnb4(torch.randn(n, k, generator=gen), blocksize, codebook)
    table = torch.tensor(codebook, dtype=torch.float32)
    x = torch.randn(m, k, generator=gen).to(dtype)
    packed, absmax, table, x = (t.to(KERNEL_DEVICE) for t in (packed, absmax, table, x))
    out = bnb4_gemm_triton(x, packed, absmax, table, blocksize)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, bnb4_linear_ref(x.double(), packed, absmax, table, blocksize), 4 * TOLERANCE[dtype], "bnb4")


@pytest.mark.parametrize("m", [1, 40])
def test_nvfp4_form_with_fp8_block_scales_and_row_scales_matches_reference(m):
    """NVFP4's form: e2m1 codes, an fp8 scale per 16 weights and a global scale per output row applied to the
    product (``ROW_SCALES``): the kernel as the reference's dequantization (fp8 scales widened, rows scaled)."""
    gen = torch.Generator().manual_seed(m + 5)
    n, k = 96, 256
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scale = torch.empty(n, k // 16).uniform_(0.5, 400, generator=gen).to(torch.float8_e4m3fn)
    rows = torch.empty(n).uniform_(1e-4, 2e-4, generator=gen)
    table, x = torch.tensor(E2M1_CODEBOOK), torch.randn(m, k, generator=gen)
    packed, scale, rows, table, x = (t.to(KERNEL_DEVICE) for t in (packed, scale, rows, table, x))
    out = bnb4_gemm_triton(x, packed, scale, table, 16, rows)
    ref = bnb4_linear_ref(x.double(), packed, scale, table, 16, row_scale=rows)
    assert_close(out, ref, 4 * TOLERANCE[torch.float32], "nvfp4")
    assert not torch.allclose(ref, bnb4_linear_ref(x.double(), packed, scale, table, 16))


def test_dispatcher_on_cpu_takes_reference_and_adds_the_bias():
    packed, absmax = quantize_bnb4(torch.randn(32, 64))
    table, x, bias = torch.tensor(NF4_CODEBOOK), torch.randn(3, 64), torch.randn(32)
    torch.testing.assert_close(bnb4_linear(x, packed, absmax, table, 64, bias),
                               bnb4_linear_ref(x, packed, absmax, table, 64) + bias)
