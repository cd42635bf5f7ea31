"""The byte-codes decode GEMV (kernels/codes_gemv.py) against each format's reference: 4-bit codebook weights
(NF4's blocks of 64, NVFP4's fp8 scales per 16 with a row scale) and 8-bit weights (a scale per row; group scales
with zero points), at 1-16 rows of x, several row blocks and K steps (interpreted on CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

from kernels.bnb4_gemm import E2M1_CODEBOOK, NF4_CODEBOOK, bnb4_linear_ref, quantize_bnb4
from kernels.codes_gemv import CodesGemvConfig, codes_gemv, default_config, gemv_fits
from kernels.int8_gemm import int8_linear_ref, quantize_int8_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 rows are read as int32 pairs by the 4-bit path, so the interpreter runs them; its bf16 loads are not exact
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EIGHT_BIT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}  # the output rounding


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e}"


def _four_bit(n: int, k: int, kind: str, gen: torch.Generator):
    """(codes, absmax, codebook, block, row_scale) of a random ``[n, k]`` weight quantized as NF4 or NVFP4."""
    weight = torch.randn(n, k, generator=gen)
    if kind == "nf4":
        codes, absmax = quantize_bnb4(weight, 64, NF4_CODEBOOK)
        return codes, absmax, torch.tensor(NF4_CODEBOOK), 64, None
    codes, absmax = quantize_bnb4(weight, 16, tuple(v / 6 for v in E2M1_CODEBOOK))
    row = (absmax / 6).amax(-1) / 448
    return codes, (absmax / 6 / row[:, None]).to(torch.float8_e4m3fn), torch.tensor(E2M1_CODEBOOK), 16, row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["nf4", "nvfp4"])
@pytest.mark.parametrize("m, config", [(1, CodesGemvConfig(16, 32, 4)), (1, None),
                                       (3, CodesGemvConfig(8, 64, 2, ahead=2)), (6, CodesGemvConfig(32, 16, 4)),
                                       (16, None)])  # fmt: skip
def test_four_bit_codes_match_reference(dtype, kind, m, config):
    """Each byte's two codes (high nibble first) looked up in the codebook and scaled by their block's absmax (steps
    inside one block and over several), NVFP4's row scale after the sum; bf16 rows read as int32 pairs."""
    gen = torch.Generator().manual_seed(m)
    n, k = 42, 512  # a partial row block at 4, 8, 16 and 32 rows a program; the default steps are 256 bytes
    codes, absmax, codebook, block, row = _four_bit(n, k, kind, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    ref = bnb4_linear_ref(x.float(), codes, absmax, codebook, block, row_scale=row)
    to = (lambda t: t.to(DEVICE) if t is not None else None)  # noqa: E731
    out = codes_gemv(x.to(DEVICE), to(codes), to(absmax), four_bit=True, group=block, row_scale=to(row),
                     config=config, codebook=to(codebook))  # fmt: skip
    assert out.dtype == dtype and out.shape == (m, n)
    _close(out.cpu(), ref, dtype)


@pytest.mark.parametrize("dtype", EIGHT_BIT_DTYPES)
@pytest.mark.parametrize("group", [0, 32, 128])
@pytest.mark.parametrize("m", [1, 4, 9])
def test_eight_bit_codes_match_reference(dtype, group, m):
    """int8 codes with a scale per row (after the sum), uint8 codes with group scales and zero points per step."""
    gen = torch.Generator().manual_seed(group + m)
    n, k = 24, 256
    if group:
        codes = torch.randint(0, 256, (n, k), generator=gen).to(torch.uint8)
        scale = torch.rand(n, k // group, generator=gen) / 64 + 1e-3
        zeros = torch.randint(100, 156, (n, k // group), generator=gen).float()
    else:
        codes, absmax = quantize_int8_rows(torch.randn(n, k, generator=gen))
        scale, zeros = absmax / 127, None
    x = torch.randn(m, k, generator=gen).to(dtype)
    ref = int8_linear_ref(x.float(), codes, scale, zeros=zeros, group=group)
    config = CodesGemvConfig(8, 32, 2, ahead=2) if m == 4 else None
    out = codes_gemv(x.to(DEVICE), codes.to(DEVICE), scale.to(DEVICE), four_bit=False, group=group,
                     zeros=zeros.to(DEVICE) if zeros is not None else None, config=config)  # fmt: skip
    _close(out.cpu(), ref, dtype)


def test_default_config_by_rows_and_format():
    """The fastest measured: 4-bit 4 rows a program in steps of up to 256 bytes on one warp at one to four rows of
    x; 8-bit 8 rows, one row of x in steps of up to 256 bytes on one warp (128 or less on two), more in 128."""
    assert default_config(2048, True, 64, 1) == CodesGemvConfig(4, 256, 1)
    assert default_config(2048, True, 64, 4) == CodesGemvConfig(4, 256, 1)
    assert default_config(96, True, 16, 1) == CodesGemvConfig(4, 32, 1)
    assert default_config(4096, False, 0, 4) == CodesGemvConfig(8, 128, 1)
    assert default_config(4096, False, 0, 1) == CodesGemvConfig(8, 256, 1)
    assert default_config(4096, False, 128, 1) == CodesGemvConfig(8, 128, 2)


def test_gemv_fits_whole_steps_only():
    assert gemv_fits(4096, True, 64) and gemv_fits(4096, False, 128) and gemv_fits(4096, False, 0)
    assert not gemv_fits(48, True, 16)  # 24 bytes a row
    assert not gemv_fits(4096, False, 8)  # an 8-bit step of 16 bytes would span two groups
    with pytest.raises(ValueError, match="steps do not fit"):
        codes_gemv(torch.randn(1, 64), torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 2), four_bit=False,
                   group=32, config=CodesGemvConfig(8, 64, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["nf4", "nvfp4", "int8", "gptq8"])
def test_codes_dequantized_for_cublas_match_reference(dtype, kind):
    """Many rows: the weight dequantized into the scratch buffer (the reference's values, rounded once to x's dtype;
    rows past a block's end masked), then one dense GEMM."""
    from kernels.bnb4_gemm import dequantize_bnb4
    from kernels.codes_dequant import codes_dequant_gemm, dequantize_codes_into_scratch
    from kernels.int8_gemm import dequantize_int8

    gen = torch.Generator().manual_seed(5)
    n, k = 40, 256
    formats, zeros = {}, None
    if kind in ("nf4", "nvfp4"):
        codes, scale, codebook, block, row = _four_bit(n, k, kind, gen)
        expected = dequantize_bnb4(codes, scale, codebook, block, row)
        formats = dict(four_bit=True, group=block, codebook=codebook.to(DEVICE),
                       row_scale=row.to(DEVICE) if row is not None else None)  # fmt: skip
    elif kind == "int8":
        codes, absmax = quantize_int8_rows(torch.randn(n, k, generator=gen))
        scale = absmax / 127
        expected = dequantize_int8(codes, scale)
        formats = dict(four_bit=False, group=0)
    else:
        codes = torch.randint(0, 256, (n, k), generator=gen).to(torch.uint8)
        scale = torch.rand(n, k // 32, generator=gen) / 64 + 1e-3
        zeros = torch.randint(100, 156, (n, k // 32), generator=gen).float()
        expected = dequantize_int8(codes, scale, zeros, 32)
        formats = dict(four_bit=False, group=32, zeros=zeros.to(DEVICE))
    codes, scale = codes.to(DEVICE), scale.to(DEVICE)
    weight = dequantize_codes_into_scratch(codes, scale, dtype, **formats)
    assert weight.shape == (n, k) and weight.dtype == dtype
    assert torch.equal(weight.cpu(), expected.to(dtype))
    x = torch.randn(21, k, generator=gen).to(dtype)
    out = codes_dequant_gemm(x.to(DEVICE), codes, scale, **formats)
    _close(out.cpu(), x.float() @ expected.t(), dtype)


@pytest.mark.gpu
def test_bf16_rows_off_a_four_byte_boundary_are_read_as_halves():
    """bf16 rows whose first element is not 4-byte aligned (a view into a larger buffer) cannot be read as int32
    pairs: the kernel reads them element by element, with the same result."""
    gen = torch.Generator().manual_seed(9)
    codes, absmax, codebook, block, _ = _four_bit(24, 128, "nf4", gen)
    backing = torch.randn(1 + 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    x = backing[1:].view(1, 128)
    assert x.data_ptr() % 4
    out = codes_gemv(x, codes.to(DEVICE), absmax.to(DEVICE), four_bit=True, group=block, codebook=codebook.to(DEVICE))
    _close(out.cpu(), bnb4_linear_ref(x.cpu().float(), codes, absmax, codebook, block), torch.bfloat16)
