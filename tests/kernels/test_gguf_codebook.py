"""GGUF IQ4_NL / IQ4_XS in the 4-bit codebook kernels' form: writers of the blocks (gguf-py writes no IQ types), the
repack against gguf-py's own dequantizer (bit for bit), and the codebook kernel (interpreter on CPU) on the repacked
weight."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from kernels.bnb4_gemm import bnb4_gemm_triton, bnb4_linear_ref, dequantize_bnb4
from kernels.gguf_codebook import CODEBOOK_TYPES, IQ4_CODEBOOK, IQ4_NL, IQ4_XS, iq4_blocks_as_codebook
from tests.kernels.kernel_testing import KERNEL_DEVICE, TOLERANCE, assert_close

KVALUES = np.array(IQ4_CODEBOOK, np.float32)


def _nearest(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Each value's index into the table once divided by its scale (0 where the scale is)."""
    scaled = x / np.where(scale == 0, 1, scale)[..., None]
    return np.abs(scaled[..., None] - KVALUES).argmin(-1).astype(np.uint8)


def _pack_32(q: np.ndarray) -> np.ndarray:
    """``[..., 32]`` indices -> IQ4_NL's 16 bytes: element ``j`` in byte ``j``'s low nibble, ``j + 16`` its high."""
    return q[..., :16] | (q[..., 16:] << 4)


def quantize_iq4_nl(array: np.ndarray) -> np.ndarray:
    """``[..., K]`` floats as IQ4_NL blocks ``uint8 [..., K / 32 * 18]``: each block's fp16 ``d = absmax / 127``,
    its weights' nearest table entries (llama.cpp searches ``d``; the layout is the same)."""
    shape = array.shape
    x = array.astype(np.float32).reshape(-1, 32)
    d = (np.abs(x).max(-1) / 127).astype(np.float16)
    out = np.zeros((x.shape[0], 18), np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
    out[:, 2:] = _pack_32(_nearest(x, d.astype(np.float32)))
    return out.reshape(*shape[:-1], shape[-1] // 32 * 18)


def quantize_iq4_xs(array: np.ndarray) -> np.ndarray:
    """``[..., K]`` floats (K a multiple of 256) as IQ4_XS super-blocks ``uint8 [..., K / 256 * 136]``: each 32-weight
    sub-block's scale ``absmax / 127`` as a 6-bit ``ls - 32`` multiple of the super-block's fp16 ``d``, rounded."""
    shape = array.shape
    x = array.astype(np.float32).reshape(-1, 8, 32)
    ideal = np.abs(x).max(-1) / 127  # [blocks, 8]
    d = (ideal.max(-1) / 31).astype(np.float16)
    unit = d.astype(np.float32)[:, None]
    ls = np.clip(np.rint(ideal / np.where(unit == 0, 1, unit)) + 32, 0, 63).astype(np.uint16)
    q = _nearest(x, unit * (ls.astype(np.float32) - 32))
    out = np.zeros((x.shape[0], 136), np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
    scales_h = np.zeros(x.shape[0], np.uint16)
    for ib in range(8):
        scales_h |= (ls[:, ib] >> 4) << (2 * ib)
    out[:, 2:4] = scales_h.view(np.uint8).reshape(-1, 2)
    low = (ls & 15).astype(np.uint8)
    out[:, 4:8] = low[:, 0::2] | (low[:, 1::2] << 4)
    out[:, 8:] = _pack_32(q).reshape(-1, 128)
    return out.reshape(*shape[:-1], shape[-1] // 256 * 136)


WRITERS = {IQ4_NL: quantize_iq4_nl, IQ4_XS: quantize_iq4_xs}


@pytest.mark.parametrize("ggml_type", [IQ4_NL, IQ4_XS], ids=["IQ4_NL", "IQ4_XS"])
def test_writers_round_trip_through_gguf_py(ggml_type):
    """The writers' blocks, read by gguf-py's dequantizer, are the weights within the format's rounding."""
    w = np.random.default_rng(ggml_type).standard_normal((6, 512)).astype(np.float32)
    raw = WRITERS[ggml_type](w)
    assert raw.shape == (6, 512 // CODEBOOK_TYPES[ggml_type][0] * CODEBOOK_TYPES[ggml_type][1])
    back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(ggml_type)).reshape(w.shape)
    assert np.abs(back - w).max() < 0.25 * np.abs(w).max()


@pytest.mark.parametrize("ggml_type", [IQ4_NL, IQ4_XS], ids=["IQ4_NL", "IQ4_XS"])
def test_repacked_codes_and_scales_are_gguf_pys_weights_exactly(ggml_type):
    """Random blocks (every index, every 6-bit sub-scale, signed ``d``): the codebook form's weight equals gguf-py's
    dequantization bit for bit."""
    block, size = CODEBOOK_TYPES[ggml_type]
    gen = torch.Generator().manual_seed(ggml_type)
    raw = torch.randint(0, 256, (8, 512 // block * size), dtype=torch.uint8, generator=gen)
    d = torch.empty(8, 512 // block).uniform_(-0.1, 0.1, generator=gen).half().view(torch.uint8)
    raw.view(8, -1, size)[..., 0:2] = d.view(8, -1, 2)
    codes, absmax = iq4_blocks_as_codebook(raw, ggml_type, 512)
    assert codes.shape == (8, 256) and absmax.shape == (8, 16)
    ours = dequantize_bnb4(codes, absmax, torch.tensor(IQ4_CODEBOOK), 32)
    reference = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(ggml_type)).reshape(8, 512)
    assert np.array_equal(ours.numpy(), reference)


@pytest.mark.parametrize("ggml_type", [IQ4_NL, IQ4_XS], ids=["IQ4_NL", "IQ4_XS"])
@pytest.mark.parametrize("m", [1, 24])
def test_codebook_kernel_runs_the_repacked_weight(ggml_type, m):
    w = np.random.default_rng(m).standard_normal((40, 512)).astype(np.float32)
    codes, absmax = iq4_blocks_as_codebook(torch.from_numpy(WRITERS[ggml_type](w)), ggml_type, 512)
    table, x = torch.tensor(IQ4_CODEBOOK), torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
    codes, absmax, table, x = (t.to(KERNEL_DEVICE) for t in (codes, absmax, table, x))
    out = bnb4_gemm_triton(x, codes, absmax, table, 32)
    assert_close(out, bnb4_linear_ref(x.double(), codes, absmax, table, 32), 4 * TOLERANCE[torch.float32], "iq4")
