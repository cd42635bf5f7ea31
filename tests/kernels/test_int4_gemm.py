"""int4 GEMM (w4a16) against a float64 dequantize-then-matmul reference, and the int4 packers' bit orders.

The Triton kernels run on ``KERNEL_DEVICE`` (the interpreter on CPU) at small shapes in fp32/fp16: the tl.dot kernel
in both launch shapes (decode M <= 16 with split-K, prefill), the CUDA-core fma kernel (M = 1..4, tiles spanning
several groups or a part of one, ragged N), blocks that straddle group boundaries' edges, zero points, and GPTQ
act-order permutations (rows sorted by group at load, x's columns gathered by the permutation).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels.int4_gemm import (AWQ_ORDER, INT4_DEFAULT_CONFIGS, _dequant_halves, dequantize_int4,
                               int4_decode_or_prefill_gemm, int4_dequant_gemm, int4_fma_gemm, int4_gemm, int4_linear,
                               int4_linear_ref, int4_mma_gemm, pack_int4_columns,
                               pack_int4_kernel, pack_int4_rows, pick_int4_config, tile_int4, tiling_supported,
                               unpack_int4_columns, unpack_int4_kernel, unpack_int4_rows, untile_int4)
from kernels.skinny_gemm import SkinnyConfig
from tests.kernels.kernel_testing import KERNEL_DEVICE, assert_close

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3}


def random_int4(k: int, n: int, group: int, gen: torch.Generator, g_idx: torch.Tensor | None = None):
    """Random codes, zero points (0..15) and positive scales; the float64 weight they stand for."""
    q = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (k // group, n), generator=gen)
    scales = torch.rand(k // group, n, generator=gen, dtype=torch.float64) * 0.02 + 0.005
    groups = torch.arange(k) // group if g_idx is None else g_idx
    weight = (q.double() - zeros.double()[groups]) * scales[groups]
    return q, zeros, scales, weight


def test_packers_follow_the_published_bit_orders():
    q = torch.arange(16).repeat(2, 1)[:, :16] % 16  # [2, 16]
    packed = pack_int4_columns(q, AWQ_ORDER)
    # AutoAWQ: nibble i of the first int32 holds column AWQ_ORDER[i] -> 0, 2, 4, 6, 1, 3, 5, 7
    first = int(packed[0, 0]) & 0xFFFFFFFF
    assert [(first >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(unpack_int4_columns(packed, AWQ_ORDER), q)
    assert torch.equal(unpack_int4_columns(pack_int4_columns(q)), q)
    rows = torch.randint(0, 16, (16, 5), generator=torch.Generator().manual_seed(0))
    packed_rows = pack_int4_rows(rows)
    assert packed_rows.dtype == torch.int32 and packed_rows.shape == (2, 5)
    assert (int(packed_rows[1, 3]) & 0xFFFFFFFF) >> 28 == int(rows[15, 3])  # row 8j + 7 in the top nibble
    assert torch.equal(unpack_int4_rows(packed_rows), rows)


def test_kernel_layout_interleaves_rows_within_blocks_of_32():
    """Nibble i of word 4c + r of a column holds input row 32c + 4i + r (so four consecutive words' nibble i cover
    four consecutive rows); the packer and unpacker invert each other."""
    k, n = 64, 3
    q = (torch.arange(k)[:, None] + 5 * torch.arange(n)[None, :]) % 16
    packed = pack_int4_kernel(q)
    assert packed.dtype == torch.int32 and packed.shape == (n, k // 8)
    for col in range(n):
        for word in range(k // 8):
            bits = int(packed[col, word]) & 0xFFFFFFFF
            c, r = divmod(word, 4)
            assert [(bits >> (4 * i)) & 0xF for i in range(8)] == [int(q[32 * c + 4 * i + r, col]) for i in range(8)]
    assert torch.equal(unpack_int4_kernel(packed), q)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_int4_kernel(torch.zeros(48, 8, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, n, k, group, block_k, split_k", [
    (1, 48, 128, 32, 32, 1),  # N not a multiple of block_n (masked columns)
    (3, 64, 256, 64, 32, 3),  # split-K with an uneven last split; two blocks per group
    (16, 32, 128, 128, 64, None),  # one group over K, default split
    (5, 96, 192, 32, 32, 4),
    (33, 40, 128, 64, 64, 1),  # prefill launch shape (M > 16), M not a multiple of 64
    (70, 64, 256, 32, 32, 1),
])
def test_int4_gemm_matches_reference(m, n, k, group, block_k, split_k, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    q, zeros, scales, weight = random_int4(k, n, group, gen)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    args = (pack_int4_kernel(q), scales.to(dtype), zeros.to(dtype))
    out = int4_gemm(x.to(dtype).to(KERNEL_DEVICE), *(a.to(KERNEL_DEVICE) for a in args), group,
                    block_n=32, block_k=block_k, split_k=split_k)
    assert out.shape == (m, n) and out.dtype == dtype

    reference = x.to(dtype).double() @ dequantize_int4(args[0], args[1].double(), args[2].double(), group).double()
    assert_close(out, reference, TOLERANCE[dtype], f"int4 gemm {m}x{n}x{k} g{group} {dtype}")
    assert_close(int4_linear_ref(x.to(dtype), *args, group), x @ weight, 2e-3 if dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_act_order_permutation(dtype):
    """GPTQ act-order: g_idx is a shuffled assignment of rows to groups; sorting the rows by group (as the loader
    does) and gathering x's columns by the same permutation gives x @ W for the original layout."""
    k, n, group, m = 128, 32, 32, 4
    gen = torch.Generator().manual_seed(7)
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=gen)]
    q, zeros, scales, weight = random_int4(k, n, group, gen, g_idx=g_idx)
    perm = torch.argsort(g_idx, stable=True)
    args = (pack_int4_kernel(q[perm]), scales.to(dtype), zeros.to(dtype))
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    expected = x.to(dtype).double() @ ((q.double() - zeros.to(dtype).double()[g_idx]) * scales.to(dtype).double()[g_idx])
    out = int4_gemm(x.to(dtype)[:, perm].contiguous().to(KERNEL_DEVICE), *(a.to(KERNEL_DEVICE) for a in args), group,
                    block_n=32, block_k=32)
    assert_close(out, expected, TOLERANCE[dtype], "act-order kernel")
    ref = int4_linear(x.to(dtype), *args, group, perm.to(torch.int32))  # CPU: the reference path
    assert_close(ref, expected, TOLERANCE[dtype], "act-order reference")
    x_perm = x.to(dtype)[:, perm].contiguous().to(KERNEL_DEVICE)
    for config in ("fma:8x64:w2:p0", "fma:4x128:w1:p0"):  # the decode fma kernel on the permuted rows
        out = int4_fma_gemm(x_perm, *(a.to(KERNEL_DEVICE) for a in args), group, SkinnyConfig.parse(config))
        assert_close(out, expected, TOLERANCE[dtype], f"act-order fma {config}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, n, k, group, config", [
    (1, 48, 256, 128, "fma:8x256:w2:p0"),  # a tile of two groups
    (2, 37, 256, 32, "fma:4x128:w1:p0"),  # ragged N (columns past N re-read the last one), four groups per tile
    (3, 20, 384, 128, "fma:16x64:w2:p0"),  # tiles of half a group; M = 3 in a program of 4 rows
    (4, 64, 192, 64, "fma:8x64:w1:p0"),  # one group per tile, three tiles
    (4, 9, 96, 96, "fma:2x32:w1:p0"),  # one group over K (group -1), tiles of a third of it
    (1, 8, 64, 32, "fma:1x64:w1:p0"),  # one column, one tile
])
def test_int4_fma_kernel_matches_reference(m, n, k, group, config, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    q, zeros, scales, _ = random_int4(k, n, group, gen)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    args = (pack_int4_kernel(q), scales.to(dtype), zeros.to(dtype))
    out = int4_fma_gemm(x.to(dtype).to(KERNEL_DEVICE), *(a.to(KERNEL_DEVICE) for a in args), group,
                        SkinnyConfig.parse(config))
    assert out.shape == (m, n) and out.dtype == dtype
    reference = x.to(dtype).double() @ dequantize_int4(args[0], args[1].double(), args[2].double(), group).double()
    assert_close(out, reference, TOLERANCE[dtype], f"int4 fma {m}x{n}x{k} g{group} {config} {dtype}")


def test_int4_decode_dispatch():
    """M <= 16 on the tensor-core kernel (the H200 sweep's choice at M = 1, whose time does not depend on M up to
    16: every bucket reuses it), block_k fitted to K and the group; tl.dot above; all match the reference."""
    assert pick_int4_config(17, 4096, 4096, 128) is None
    configs = {m: pick_int4_config(m, 4096, 4096, 128) for m in (1, 2, 3, 4, 7, 16)}
    assert set(configs.values()) == {configs[1]} and configs[1].kind in ("mma", "mms")
    assert pick_int4_config(9, 72, 256, 128) == INT4_DEFAULT_CONFIGS[1]  # a shape without entries: M = 1's default
    assert pick_int4_config(1, 4096, 4096 + 96, 32).block_k == 32  # K = 4192 = 131 * 32: only 32 divides it
    gen = torch.Generator().manual_seed(11)
    k, n, group = 512, 24, 64
    q, zeros, scales, _ = random_int4(k, n, group, gen)
    args = (pack_int4_kernel(q), scales.to(torch.float16), zeros.to(torch.float16))
    reference_w = dequantize_int4(args[0], args[1].double(), args[2].double(), group).double()
    for m in (3, 7, 20):
        x = torch.randn(m, k, generator=gen).to(torch.float16)
        out = int4_decode_or_prefill_gemm(x.to(KERNEL_DEVICE), *(a.to(KERNEL_DEVICE) for a in args), group)
        assert_close(out, x.double() @ reference_w, TOLERANCE[torch.float16], f"int4 decode m={m}")


LLAMA_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 16, 200])
@pytest.mark.parametrize("n, k", LLAMA_8B_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_linear_gpu_at_llama_shapes(m, n, k, dtype):
    gen = torch.Generator().manual_seed(m)
    group = 128
    q, zeros, scales, _ = random_int4(k, n, group, gen)
    args = (pack_int4_kernel(q).cuda(), (scales * 0.1).to(dtype).cuda(), zeros.to(dtype).cuda())
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    out = int4_linear(x, *args, group)
    assert_close(out, int4_linear_ref(x, *args, group).float(), 1e-2, f"int4 m={m} {n}x{k} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 12, 200])
@pytest.mark.parametrize("n, k", LLAMA_8B_SHAPES[1:])
def test_int4_linear_gpu_on_the_tiled_layout(m, n, k):
    """The engine's tiled layers (all but qkv) through every GPU path: the Gluon GEMV (M <= 8), the tensor-core
    kernel (9-16 rows), dequantize + cuBLAS (more)."""
    gen = torch.Generator().manual_seed(m)
    q, zeros, scales, _ = random_int4(k, n, 128, gen)
    args = tile_int4(pack_int4_kernel(q).cuda(), (scales * 0.1).to(torch.bfloat16).cuda(),
                     zeros.to(torch.bfloat16).cuda())
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    out = int4_linear(x, *args, 128, tiled=True)
    assert_close(out, int4_linear_ref(x, *args, 128, tiled=True).float(), 1e-2, f"tiled int4 m={m} {n}x{k}")


def test_decode_launch_splits_k_only_for_small_layers():
    from kernels.split_k import decode_launch

    for n, k in LLAMA_8B_SHAPES:  # enough output blocks: no partial sums, no reduction launch
        assert decode_launch(n, k // 128, None)[1] == 1
    block_n, split = decode_launch(576, 576 // 64, None)  # SmolLM2's o_proj: 36 blocks of 16 rows
    assert block_n == 16 and split > 1


# ------------------------------------------------------------------------------ mma kernel (tensor cores, M <= 16)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, n, k, group, config, split_k", [
    (1, 64, 256, 128, "mma:64x128:w4:s1", 1),  # one group per tile
    (3, 100, 256, 32, "mma:64x128:w4:s2", 2),  # tiles of four groups (scales broadcast per group), ragged N, split K
    (16, 64, 256, 64, "mma:64x32:w4:s1", None),  # tiles of half a group, all 16 rows
    (5, 130, 384, 128, "mma:128x64:w4:s1", 3),  # N past two blocks of 128, uneven split
    (1, 72, 96, 96, "mma:64x32:w4:s1", 1),  # one group over K (group -1), tiles of a third of it
    (16, 64, 128, 64, "mma:64x128:w4:s1", 1),  # one tile of two groups
    # mms: q - z into the MMA, each tile's product scaled per column (tiles within one group)
    (1, 64, 256, 128, "mms:64x128:w4:s1", 1),
    (3, 100, 256, 64, "mms:64x32:w4:s2", 3),
    (16, 130, 384, 128, "mms:128x64:w4:s1", None),
    (2, 72, 96, 96, "mms:64x32:w4:s1", 1),
])
def test_int4_mma_kernel_matches_reference(m, n, k, group, config, split_k, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n + k + group)
    q, zeros, scales, _ = random_int4(k, n, group, gen)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    args = (pack_int4_kernel(q), scales.to(dtype), zeros.to(dtype))
    out = int4_mma_gemm(x.to(dtype).to(KERNEL_DEVICE), *(a.to(KERNEL_DEVICE) for a in args), group,
                        SkinnyConfig.parse(config), split_k=split_k)
    assert out.shape == (m, n) and out.dtype == dtype
    reference = int4_linear_ref(x.to(dtype).double(), args[0], args[1].double(), args[2].double(), group)
    assert_close(out, reference, TOLERANCE[dtype], f"int4 mma {m}x{n}x{k} g{group} {config} {dtype}")


def test_int4_mma_kernel_takes_the_configs_k_split(monkeypatch):
    """A config's ``:kS`` sets the launch's K splits instead of ``decode_launch``'s rule (not consulted)."""
    import kernels.split_k as split_k_module

    monkeypatch.setattr(split_k_module, "decode_launch", lambda *a, **k: pytest.fail("the rule was consulted"))
    gen = torch.Generator().manual_seed(5)
    q, zeros, scales, _ = random_int4(256, 64, 64, gen)
    x = torch.randn(2, 256, generator=gen)
    args = (pack_int4_kernel(q), scales, zeros)
    out = int4_mma_gemm(x.to(KERNEL_DEVICE), *(a.to(KERNEL_DEVICE) for a in args), 64,
                        SkinnyConfig.parse("mma:64x64:w4:s1:k3"))
    reference = int4_linear_ref(x.double(), args[0], args[1].double(), args[2].double(), 64)
    assert_close(out, reference, TOLERANCE[torch.float32], "int4 mma with a fixed K split")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, n, k, group, config, split_k", [
    (1, 64, 128, 32, "mma:64x32:w4:s1", 1),  # GGUF Q4's group 32, one tile per group
    (5, 100, 256, 32, "mma:64x128:w4:s2", 2),  # tiles of four groups, ragged N, split K
    (16, 130, 256, 64, "mma:128x32:w4:s1", None),  # half-group tiles
])
def test_int4_mma_kernel_fractional_zero_points(m, n, k, group, config, split_k, dtype):
    """Zero points that are not whole numbers (GGUF Q4_1's ``-m / d``, any real): the mma kind with
    ``integer_zeros=False`` adds their fractional part apart, against the reference; the mms kind is refused."""
    gen = torch.Generator().manual_seed(m * 100 + n + k)
    q, _, scales, _ = random_int4(k, n, group, gen)
    zeros = torch.empty(k // group, n).uniform_(-20.0, 20.0, generator=gen)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    args = (pack_int4_kernel(q), scales.to(dtype), zeros.to(dtype))
    out = int4_mma_gemm(x.to(dtype).to(KERNEL_DEVICE), *(a.to(KERNEL_DEVICE) for a in args), group,
                        SkinnyConfig.parse(config), split_k=split_k, integer_zeros=False)
    reference = int4_linear_ref(x.to(dtype).double(), args[0], args[1].double(), args[2].double(), group)
    assert_close(out, reference, TOLERANCE[dtype], f"int4 mma fractional zeros {m}x{n}x{k} g{group} {dtype}")
    with pytest.raises(ValueError, match="need an mma config"):
        int4_mma_gemm(x.to(dtype).to(KERNEL_DEVICE), *(a.to(KERNEL_DEVICE) for a in args), group,
                      SkinnyConfig.parse("mms:64x32:w4:s1"), integer_zeros=False)


def test_int4_dequant_gemm_matches_reference():
    """Many rows: the weight dequantized into the shared scratch buffer, then the dense GEMM; a larger layer grows
    the buffer, a smaller one after it reuses it (group 32 with fractional zero points, group 128, one group)."""
    gen = torch.Generator().manual_seed(3)
    for m, n, k, group in [(20, 40, 64, 32), (33, 72, 256, 128), (5, 24, 96, 96)]:
        q, zeros, scales, _ = random_int4(k, n, group, gen)
        if group == 32:
            zeros = zeros + torch.rand(zeros.shape, generator=gen)  # GGUF Q4_1's -m / d
        args = (pack_int4_kernel(q), scales.to(torch.float16), zeros.to(torch.float16))
        x = torch.randn(m, k, generator=gen).to(torch.float16)
        out = int4_dequant_gemm(x.to(KERNEL_DEVICE), *(a.to(KERNEL_DEVICE) for a in args), group)
        assert out.shape == (m, n) and out.dtype == torch.float16
        reference = int4_linear_ref(x.double(), args[0], args[1].double(), args[2].double(), group)
        assert_close(out, reference, TOLERANCE[torch.float16], f"int4 dequant+GEMM {m}x{n}x{k} g{group}")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [128, 1000])
def test_int4_linear_gpu_dequantizes_for_many_rows(m):
    """From ``INT4_DEQUANT_MIN_M`` rows the dispatcher dequantizes and calls cuBLAS; group 32 with fractional zero
    points (GGUF Q4_1) at a Llama shape against the reference."""
    from kernels.int4_gemm import INT4_DEQUANT_MIN_M

    assert m >= INT4_DEQUANT_MIN_M
    gen = torch.Generator().manual_seed(m)
    n, k, group = 4096, 14336, 32
    q, zeros, scales, _ = random_int4(k, n, group, gen)
    zeros = zeros + torch.rand(zeros.shape, generator=gen)
    args = (pack_int4_kernel(q).cuda(), (scales * 0.1).bfloat16().cuda(), zeros.bfloat16().cuda())
    x = torch.randn(m, k, generator=gen).bfloat16().cuda()
    out = int4_linear(x, *args, group, integer_zeros=False)
    assert_close(out, int4_linear_ref(x, *args, group).float(), 1e-2, f"int4 dequant m={m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_mma_act_order(dtype):
    """GPTQ act-order through the mma kernel: rows sorted by group, x's columns gathered by the permutation."""
    k, n, group = 256, 64, 64
    gen = torch.Generator().manual_seed(21)
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=gen)]
    q, zeros, scales, _ = random_int4(k, n, group, gen, g_idx=g_idx)
    perm = torch.argsort(g_idx, stable=True)
    args = tuple(a.to(KERNEL_DEVICE) for a in (pack_int4_kernel(q[perm]), scales.to(dtype), zeros.to(dtype)))
    w = (q.double() - zeros.to(dtype).double()[g_idx]) * scales.to(dtype).double()[g_idx]
    for m in (1, 3, 16):
        x = torch.randn(m, k, generator=gen, dtype=torch.float64).to(dtype)
        for config in ("mma:64x64:w4:s1", "mma:64x128:w4:s1", "mms:64x64:w4:s1"):
            out = int4_mma_gemm(x[:, perm].contiguous().to(KERNEL_DEVICE), *args, group, SkinnyConfig.parse(config))
            assert_close(out, x.double() @ w, TOLERANCE[dtype], f"act-order mma m={m} {config}")


def test_int4_mma_rejects_what_it_cannot_run():
    x = torch.zeros(4, 256, dtype=torch.float16, device=KERNEL_DEVICE)
    qweight = torch.zeros(64, 32, dtype=torch.int32, device=KERNEL_DEVICE)
    sz = torch.ones(2, 64, dtype=torch.float16, device=KERNEL_DEVICE)
    config = SkinnyConfig.parse("mma:64x128:w4:s1")
    with pytest.raises(ValueError, match="at most 16 rows"):
        int4_mma_gemm(torch.zeros(17, 256, dtype=torch.float16, device=KERNEL_DEVICE), qweight, sz, sz, 128, config)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        int4_mma_gemm(torch.zeros(4, 240, dtype=torch.float16, device=KERNEL_DEVICE), qweight[:, :30], sz, sz, 48,
                      SkinnyConfig.parse("mma:64x32:w4:s1"))
    with pytest.raises(ValueError, match="does not fit"):  # block_k 128 and group 96 do not nest
        int4_mma_gemm(torch.zeros(4, 384, dtype=torch.float16, device=KERNEL_DEVICE),
                      torch.zeros(64, 48, dtype=torch.int32, device=KERNEL_DEVICE), sz, sz, 96, config)
    with pytest.raises(ValueError, match="does not fit"):  # mms: a tile spanning two groups
        int4_mma_gemm(x, qweight, sz, sz, 64, SkinnyConfig.parse("mms:64x128:w4:s1"))
    with pytest.raises(ValueError, match="mma or mms config"):
        int4_mma_gemm(x, qweight, sz, sz, 128, SkinnyConfig.parse("fma:8x128:w4:p0"))
    with pytest.raises(ValueError, match="does not match"):
        int4_mma_gemm(x, qweight[:, :16], sz, sz, 128, config)


def test_int4_mma_dispatch_only_where_a_table_entry_names_it(monkeypatch):
    """An ``mma`` entry sends its shape to the tensor-core kernel for every M up to 16 (block_k fitted to K and the
    group), fma entries stop at M = 4; a bucket without an entry or default reuses M = 1's only if it is mma."""
    import kernels.int4_gemm as i4

    fma = SkinnyConfig.parse("fma:8x1024:w4:p0")
    monkeypatch.setattr(i4, "INT4_DEFAULT_CONFIGS", {1: fma, 2: fma, 4: fma})
    k, n, group = 256, 72, 128
    assert pick_int4_config(8, n, k, group) is None
    monkeypatch.setitem(i4.INT4_SKINNY_CONFIGS, (8, n, k), SkinnyConfig.parse("mma:64x512:w4:s2"))
    monkeypatch.setitem(i4.INT4_SKINNY_CONFIGS, (16, n, k), SkinnyConfig.parse("mma:64x128:w4:s2"))
    assert pick_int4_config(8, n, k, group) == SkinnyConfig.parse("mma:64x256:w4:s2")  # 512 does not divide K
    assert pick_int4_config(8, n, k, 64) is None  # entries are measured at group 128; no default at M = 8
    assert pick_int4_config(17, n, k, group) is None
    monkeypatch.setitem(i4.INT4_SKINNY_CONFIGS, (1, n, k), SkinnyConfig.parse("mms:64x128:w4:s2"))
    monkeypatch.delitem(i4.INT4_SKINNY_CONFIGS, (8, n, k))
    assert pick_int4_config(5, n, k, group) == SkinnyConfig.parse("mms:64x128:w4:s2")  # M = 1's tensor-core entry
    monkeypatch.setitem(i4.INT4_SKINNY_CONFIGS, (8, n, k), SkinnyConfig.parse("mma:64x512:w4:s2"))
    monkeypatch.setitem(i4.INT4_SKINNY_CONFIGS, (4, n, k), SkinnyConfig.parse("mms:64x256:w4:s2"))
    assert pick_int4_config(3, n, k, 64).kind == "fma"  # not group 128: the M bucket's default
    assert pick_int4_config(3, n, k, group) == SkinnyConfig.parse("mms:64x128:w4:s2")  # within the group of 128
    calls = []
    real = i4.int4_mma_gemm
    monkeypatch.setattr(i4, "int4_mma_gemm", lambda *a, **kw: calls.append(a[-1]) or real(*a, **kw))
    gen = torch.Generator().manual_seed(3)
    q, zeros, scales, _ = random_int4(k, n, group, gen)
    args = tuple(a.to(KERNEL_DEVICE) for a in (pack_int4_kernel(q), scales.half(), zeros.half()))
    for m in (3, 7, 16):
        x = torch.randn(m, k, generator=gen).half()
        out = int4_decode_or_prefill_gemm(x.to(KERNEL_DEVICE), *args, group)
        assert_close(out, int4_linear_ref(x.double(), args[0].cpu(), scales.double(), zeros.double(), group),
                     TOLERANCE[torch.float16], f"dispatch m={m}")
    assert [str(c) for c in calls] == ["mms:64x128:w4:s2", "mma:64x256:w4:s2", "mma:64x128:w4:s2"]


@triton.jit
def _dequant_test_kernel(h_ptr, z_ptr, s_ptr, o_ptr, out_ptr, E: tl.constexpr, MAGIC: tl.constexpr,
                         USE_ASM: tl.constexpr, SCALE: tl.constexpr, OFFSET: tl.constexpr):  # fmt: skip
    rows = tl.arange(0, 16)
    offs = rows[:, None] * E + tl.arange(0, E)[None, :]
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    z = tl.load(z_ptr + offs).to(tl.float32)
    w = _dequant_halves(tl.load(h_ptr + offs), (MAGIC + z).to(dtype), (-(MAGIC / 16.0) - z).to(dtype),
                        tl.load(s_ptr + offs), tl.load(o_ptr + offs), dtype, USE_ASM, SCALE, OFFSET)
    for j in tl.static_range(4):
        tl.store(out_ptr + j * 16 * E + offs, w[j])


@pytest.mark.parametrize("mode", ["scale", "exact", "offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_magic_number_dequantization(dtype, mode):
    """Each nibble of each int16 becomes ``(q - z) * s`` rounded once to the dtype (bf16 included: no tl.dot here;
    ``exact``: ``q - z`` exactly; ``offset``: ``(q - z) * s + o``, the fractional zero points' form, to the dtype's
    rounding), on the GPU through the packed-half2 PTX (fp16 / bf16), in the interpreter through the plain bit ops."""
    from kernels.int4_gemm import _MAGIC_VALUES

    gen = torch.Generator().manual_seed(5)
    halves = torch.randint(-(2**15), 2**15, (16, 32), generator=gen, dtype=torch.int32).to(torch.int16)
    zeros = torch.randint(0, 17, (16, 32), generator=gen).to(dtype)
    scales = (torch.rand(16, 32, generator=gen) * 0.02 + 0.001).to(dtype)
    offsets = ((torch.rand(16, 32, generator=gen) - 0.5) * scales.float()).to(dtype)  # (zi - z) * s, |zi - z| <= 1/2
    out = torch.empty(4, 16, 32, dtype=dtype, device=KERNEL_DEVICE)
    _dequant_test_kernel[(1,)](halves.to(KERNEL_DEVICE), zeros.to(KERNEL_DEVICE), scales.to(KERNEL_DEVICE),
                               offsets.to(KERNEL_DEVICE), out, E=32, MAGIC=_MAGIC_VALUES[dtype],
                               SCALE=mode != "exact", OFFSET=mode == "offset",
                               USE_ASM=KERNEL_DEVICE == "cuda" and dtype != torch.float32)  # fmt: skip
    codes = torch.stack([(halves.int() >> (4 * j)) & 0xF for j in range(4)])
    exact = (codes.double() - zeros.double()) * (scales.double() if mode != "exact" else 1.0)  # exact in fp32
    if mode == "offset":  # one rounding on the GPU (fma), up to two in the interpreter
        exact = exact + offsets.double()
        tolerance = 2 * torch.finfo(dtype).eps * exact.abs() + torch.finfo(dtype).tiny
        assert ((out.cpu().double() - exact).abs() <= tolerance).all()
        return
    expected = exact.to(dtype)
    if dtype == torch.bfloat16 and KERNEL_DEVICE == "cpu":  # the interpreter truncates fp32 -> bf16
        truncated = (exact.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)
        assert ((out == expected) | (out == truncated)).all()
    else:
        assert torch.equal(out.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n, k", LLAMA_8B_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", ["mma:64x128:w4:s4", "mma:128x256:w8:s3", "mms:128x128:w4:s3"])
def test_int4_mma_gpu_at_llama_shapes(m, n, k, dtype, config):
    gen = torch.Generator().manual_seed(m)
    q, zeros, scales, _ = random_int4(k, n, 128, gen)
    args = (pack_int4_kernel(q).cuda(), (scales * 0.1).to(dtype).cuda(), zeros.to(dtype).cuda())
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    out = int4_mma_gemm(x, *args, 128, SkinnyConfig.parse(config))
    assert_close(out, int4_linear_ref(x, *args, 128).float(), 1e-2, f"int4 mma m={m} {n}x{k} {dtype} {config}")


# ------------------------------------------------------------------ the tiled layout (the Gluon GEMV's, tile_int4)

def test_tiled_layout_puts_each_16_columns_weight_in_one_run():
    """``tile_int4``: same shapes; the codes of 16 columns x 128 input rows are one kilobyte (a chunk's 16 x 64
    bytes, then the next chunk's), the scales of 16 columns one run per tile; ``untile_int4`` undoes it."""
    gen = torch.Generator().manual_seed(11)
    q, zeros, scales, _ = random_int4(256, 48, 128, gen)
    packed = pack_int4_kernel(q)
    tiled = tile_int4(packed, scales, zeros.double())
    assert [t.shape for t in tiled] == [packed.shape, scales.shape, zeros.shape]
    flat = tiled[0].reshape(-1)
    # tile 1 (columns 16..31), chunk 1 (input rows 128..255), column 16 + 3: words 16..31 of that column
    assert torch.equal(flat[(1 * 2 + 1) * 256 + 3 * 16:][:16], packed[19, 16:32])
    assert tiled[1].reshape(-1)[2 * 2 * 16 + 1 * 16 + 5] == scales[1, 37]  # tile 2, group 1, column 32 + 5
    back = untile_int4(*tiled)
    assert torch.equal(back[0], packed) and torch.equal(back[1], scales) and torch.equal(back[2], zeros.double())
    assert tiling_supported(48, 256, 128) and not tiling_supported(40, 256, 128)
    assert not tiling_supported(48, 256, 64)
    with pytest.raises(ValueError, match="tiled int4 layout"):
        tile_int4(pack_int4_kernel(q[:, :40]), scales[:, :40], zeros[:, :40])


@pytest.mark.parametrize("kernel", ["dot-decode", "dot-prefill", "fma", "fma-wide", "mma", "mma-wide", "mms",
                                    "dequant"])
def test_every_triton_kernel_reads_the_tiled_layout(kernel):
    """A layer whose weight takes the tiled layout (for the Gluon GEMV) runs every other int4 path on it too: more
    rows, act-order, prefill. Each Triton kernel on the tiled tensors gives the plain layout's result."""
    m = {"dot-prefill": 20, "mma": 9, "mma-wide": 12, "mms": 16, "dequant": 17}.get(kernel, 3)
    n, k, group = 48, 512, 128
    gen = torch.Generator().manual_seed(len(kernel))
    q, zeros, scales, _ = random_int4(k, n, group, gen)
    args = (pack_int4_kernel(q), scales.float(), zeros.float())
    tiled = tile_int4(*args)
    x = torch.randn(m, k, generator=gen).to(KERNEL_DEVICE)
    on = {"dot-decode": lambda a, t: int4_gemm(x, *a, group, block_n=32, block_k=64, split_k=2, tiled=t),
          "dot-prefill": lambda a, t: int4_gemm(x, *a, group, block_n=32, tiled=t),
          "fma": lambda a, t: int4_fma_gemm(x, *a, group, SkinnyConfig.parse("fma:16x64:w2:p0"), t),
          "fma-wide": lambda a, t: int4_fma_gemm(x, *a, group, SkinnyConfig.parse("fma:8x256:w2:p0"), t),
          "mma": lambda a, t: int4_mma_gemm(x, *a, group, SkinnyConfig.parse("mma:64x64:w4:s1"), split_k=2, tiled=t),
          "mma-wide": lambda a, t: int4_mma_gemm(x, *a, group, SkinnyConfig.parse("mma:64x256:w4:s1"), tiled=t),
          "mms": lambda a, t: int4_mma_gemm(x, *a, group, SkinnyConfig.parse("mms:64x128:w4:s1"), tiled=t),
          "dequant": lambda a, t: int4_dequant_gemm(x, *a, group, t)}[kernel]
    plain = on(tuple(a.to(KERNEL_DEVICE) for a in args), False)
    reference = int4_linear_ref(x.double().cpu(), *tiled, group, tiled=True)
    assert_close(on(tuple(a.to(KERNEL_DEVICE) for a in tiled), True), reference, TOLERANCE[torch.float32], kernel)
    assert_close(plain, reference, TOLERANCE[torch.float32], f"{kernel} plain")
