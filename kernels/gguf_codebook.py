"""GGUF's non-linear 4-bit types, IQ4_NL and IQ4_XS, in the 4-bit codebook kernels' form (``kernels/bnb4_gemm.py``,
the fused MoE kernel's codebook experts): each weight is an index into llama.cpp's 16-value table ``kvalues_iq4nl``
times its block of 32's scale, which is the bitsandbytes form with that table as the codebook.

- IQ4_NL (blocks of 32, 18 bytes): ``d`` (fp16), then 16 bytes whose low nibbles index elements 0..15 and high
  nibbles elements 16..31; ``W = d * kvalues[q]``.
- IQ4_XS (super-blocks of 256, 136 bytes): ``d`` (fp16), ``scales_h`` (2 bytes: 2 high bits per sub-block),
  ``scales_l`` (4 bytes: 4 low bits per sub-block), then 8 sub-blocks of 32 laid out as IQ4_NL's 16 bytes; sub-block
  ``j``'s scale is ``d * (ls - 32)`` with its 6-bit ``ls``.

Repacked at load: the codes into the kernels' order (byte ``b`` holds elements ``2b`` high nibble, ``2b + 1`` low),
each block's scale in fp32 (an fp16 times a small integer: exact), so ``codebook[q] * absmax`` is llama.cpp's weight
exactly; 4.5 bits a weight against the file's 4.5 (IQ4_NL) and 4.25 (IQ4_XS).
"""

from __future__ import annotations

import torch

from kernels.bnb4_gemm import pack_codes

IQ4_NL, IQ4_XS = 20, 23  # GGMLQuantizationType values
# GGMLQuantizationType -> (elements per block, bytes per block)
CODEBOOK_TYPES: dict[int, tuple[int, int]] = {IQ4_NL: (32, 18), IQ4_XS: (256, 136)}
CODEBOOK_BLOCK = 32  # weights per scale once repacked
IQ4_CODEBOOK = (-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0, 1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0,
                113.0)  # llama.cpp's kvalues_iq4nl  # fmt: skip


def _nibbles_of_32(qs: torch.Tensor) -> torch.Tensor:
    """``[..., 16]`` bytes of a block of 32 -> its ``[..., 32]`` indices: low nibbles first, then high ones."""
    return torch.cat([qs & 15, qs >> 4], -1)


def iq4_blocks_as_codebook(raw: torch.Tensor, ggml_type: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An IQ4_NL / IQ4_XS weight ``uint8 [N, row_bytes]`` as the codebook kernels' ``(codes [N, K / 2] uint8, high
    nibble first; fp32 absmax [N, K / 32])`` with :data:`IQ4_CODEBOOK`."""
    block, type_size = CODEBOOK_TYPES[ggml_type]
    n = raw.shape[0]
    blocks = raw.reshape(n, in_features // block, type_size)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # [N, blocks, 1]
    if ggml_type == IQ4_NL:
        codes = _nibbles_of_32(blocks[..., 2:18])  # [N, blocks, 32]
        scales = d
    else:
        codes = _nibbles_of_32(blocks[..., 8:].reshape(n, -1, 8, 16))  # [N, blocks, 8, 32]
        words = blocks.to(torch.int32)
        sub = torch.arange(8, device=raw.device)
        low = (words[..., 4 + sub // 2] >> (4 * (sub % 2))) & 15
        scales_h = words[..., 2] | (words[..., 3] << 8)
        high = (scales_h[..., None] >> (2 * sub)) & 3
        scales = d * ((low | (high << 4)) - 32).float()  # [N, blocks, 8]
    packed = pack_codes(codes.reshape(n, in_features))
    return packed.contiguous(), scales.reshape(n, in_features // CODEBOOK_BLOCK).contiguous()
