"""Skinny GEMM (decode-sized linear layers) against a float64 reference; the dispatcher's routing.

Small shapes run on ``KERNEL_DEVICE`` (the CPU interpreter without a GPU; bf16 only through the fma kernel there,
since bf16 ``tl.dot`` is wrong in the interpreter); the real Llama-3.1-8B shapes run on the GPU (marked gpu).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import skinny_gemm as sg
from kernels.skinny_gemm import SkinnyConfig, linear, linear_ref, m_bucket, pick_config, skinny_gemm
from tests.kernels.kernel_testing import KERNEL_DEVICE, assert_close

# Output rounding dominates: one rounding of the fp32 result (2^-9 relative for bf16, 2^-12 for fp16, ~1e-7 fp32).
OUT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

SMALL_CONFIGS = [
    SkinnyConfig("fma", 8, 32, 4),
    SkinnyConfig("fma", 4, 64, 2),
    SkinnyConfig("fma", 16, 16, 1),
    SkinnyConfig("dot", 16, 32, 4, num_stages=2),
    SkinnyConfig("dot", 32, 16, 2, num_stages=3),
]


def _randn(*shape: int, gen: torch.Generator, dtype: torch.dtype, device: str, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(device)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = x.double().cpu() @ w.double().cpu().T
    return out + b.double().cpu() if b is not None else out


def _check(m, n, k, config, dtype, out_dtype, has_bias, seed, *, device=KERNEL_DEVICE, x_row_stride=None):
    gen = torch.Generator().manual_seed(seed)
    if x_row_stride is None:
        x = _randn(m, k, gen=gen, dtype=dtype, device=device)
    else:  # rows of a wider tensor, as o_proj reads q from the fused qkv output
        x = _randn(m, x_row_stride, gen=gen, dtype=dtype, device=device)[:, :k]
    w = _randn(n, k, gen=gen, dtype=dtype, device=device, scale=k**-0.5)
    b = _randn(n, gen=gen, dtype=dtype, device=device) if has_bias else None
    target = out_dtype or dtype
    out = torch.full((m, n), float("nan"), dtype=target, device=device)
    result = skinny_gemm(x, w, b, out_dtype, config=config, out=out)
    assert result.data_ptr() == out.data_ptr() and result.dtype == target and result.shape == (m, n)
    assert torch.isfinite(out).all(), f"{int((~torch.isfinite(out)).sum())} outputs left unwritten"
    assert_close(out, _reference(x, w, b), OUT_TOLERANCE[target], f"{config} M={m} N={n} K={k} {dtype}->{target}")


# --------------------------------------------------------------------------------------- small shapes (interpreter)


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=str)
@pytest.mark.parametrize(
    "m, n, k, has_bias",
    [(1, 40, 96, False), (2, 24, 80, True), (3, 56, 64, False), (4, 16, 200, True), (7, 72, 48, False),
     (16, 32, 128, True)],
)  # fmt: skip
def test_matches_float64_reference(config, m, n, k, has_bias):
    """Odd N (rows past the last block), K not a multiple of block_k (masked tail), every M bucket's edge."""
    dtype = torch.float16
    _check(m, n, k, config, dtype, None, has_bias, seed=m * 1000 + n + k)


@pytest.mark.parametrize("config", [SMALL_CONFIGS[0], SMALL_CONFIGS[3]], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float32_output(config, dtype):
    """The LM head's path: float32 logits straight from the fp32 accumulator (no bf16 rounding)."""
    _check(3, 48, 64, config, dtype, torch.float32, True, seed=7)
    _check(1, 40, 96, config, dtype, torch.float32, False, seed=8)


@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_bfloat16_fma_kernel(out_dtype):
    """bf16 through the CUDA-core kernel (no tl.dot, so the interpreter computes it right too)."""
    _check(2, 40, 96, SMALL_CONFIGS[0], torch.bfloat16, out_dtype, True, seed=11)


@pytest.mark.parametrize("config", [SMALL_CONFIGS[0], SMALL_CONFIGS[3]], ids=str)
def test_strided_and_batched_inputs(config):
    _check(3, 24, 64, config, torch.float16, None, False, seed=21, x_row_stride=96)
    gen = torch.Generator().manual_seed(22)
    x = _randn(2, 3, 64, gen=gen, dtype=torch.float16, device=KERNEL_DEVICE)
    w = _randn(40, 64, gen=gen, dtype=torch.float16, device=KERNEL_DEVICE, scale=0.125)
    out = skinny_gemm(x, w, config=config)
    assert out.shape == (2, 3, 40)
    assert_close(out, _reference(x.reshape(6, 64), w, None).reshape(2, 3, 40), OUT_TOLERANCE[torch.float16], "3-D x")


def test_every_row_block_is_written():
    """M = 6 with the fma kernel: two row programs (4 + 2), the second clamping its missing rows."""
    _check(6, 24, 32, SMALL_CONFIGS[1], torch.float32, None, True, seed=31)


# ------------------------------------------------------------------------------------------- configs, dispatcher


def test_config_string_round_trip():
    for text in ["fma:8x512:w4:p0", "fma:16x256:w8:p3", "dot:32x128:w4:s4"]:
        assert str(SkinnyConfig.parse(text)) == text
    assert SkinnyConfig.parse("dot:64x64:w4") == SkinnyConfig("dot", 64, 64, 4)
    for bad in ["fma:8x512", "dot:8x128:w4:s2", "fma:12x512:w4:p0", "dot:32x128:w4:p2", "mma:8x8:w4"]:
        with pytest.raises(ValueError):
            SkinnyConfig.parse(bad)


def test_tensor_core_configs_carry_a_fixed_k_split():
    """``:kS`` fixes an mma / mmq / mms config's K splits (a sweep's pick); the other kinds have none."""
    config = SkinnyConfig.parse("mma:128x256:w4:s3:k4")
    assert config.split_k == 4 and str(config) == "mma:128x256:w4:s3:k4"
    assert SkinnyConfig.parse("mms:128x128:w8:s3").split_k == 0  # 0: kernels/split_k.py's rule
    for bad in ["fma:8x512:w4:p0:k2", "dot:32x128:w4:s4:k2"]:
        with pytest.raises(ValueError, match="split_k"):
            SkinnyConfig.parse(bad)


def test_m_buckets_and_config_table(monkeypatch):
    assert [m_bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    special = SkinnyConfig("fma", 32, 128, 8)
    monkeypatch.setattr(sg, "SKINNY_CONFIGS", {(4, 512, 256): special, (1, 512, 256): None})
    assert pick_config(3, 512, 256) == special
    assert pick_config(1, 512, 256) is None  # None in the table sends the shape to cuBLAS
    assert pick_config(2, 512, 256) == sg.DEFAULT_CONFIGS[2]
    monkeypatch.setattr(sg, "FORCED_CONFIG", special)
    assert pick_config(1, 512, 256) == special


def test_configure_sets_only_the_given_switches(monkeypatch):
    for name in ("ENABLED", "MAX_M", "FORCED_CONFIG"):
        monkeypatch.setattr(sg, name, getattr(sg, name))  # restored after the test
    sg.configure(forced_config="dot:32x128:w4:s4", max_m=8)
    assert pick_config(1, 512, 256) == SkinnyConfig("dot", 32, 128, 4, 4)
    assert (sg.MAX_M, sg.ENABLED) == (8, True)
    sg.configure(enabled=False)
    assert (sg.ENABLED, sg.MAX_M) == (False, 8)
    assert sg.FORCED_CONFIG == SkinnyConfig("dot", 32, 128, 4, 4)
    sg.configure(forced_config="")
    assert sg.FORCED_CONFIG is None


def test_dispatcher_on_cpu_is_f_linear():
    gen = torch.Generator().manual_seed(41)
    x, w, b = torch.randn(3, 64, generator=gen), torch.randn(32, 64, generator=gen), torch.randn(32, generator=gen)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    logits = linear(x.half(), w.half(), out_dtype=torch.float32)
    assert logits.dtype == torch.float32 and torch.equal(logits, F.linear(x.half(), w.half()).float())


# ------------------------------------------------------------------------------------------------------------ GPU

LLAMA_8B_SHAPES = {  # name: (N, K)
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
    "lm_head": (128256, 4096),
}


@pytest.fixture(scope="module")
def llama_weights():
    gen = torch.Generator(device="cuda").manual_seed(0)
    return {
        name: torch.randn(n, k, generator=gen, device="cuda", dtype=torch.float32).mul_(k**-0.5).to(torch.bfloat16)
        for name, (n, k) in LLAMA_8B_SHAPES.items()
    }


def _gpu_check(x, w, b, out_dtype, **kwargs):
    m, n = x.shape[0], w.shape[0]
    target = out_dtype or x.dtype
    out = torch.full((m, n), float("nan"), dtype=target, device="cuda")
    skinny_gemm(x, w, b, out_dtype, out=out, **kwargs)
    ref = (x.double() @ w.double().T) + (b.double() if b is not None else 0)
    tol = 1e-4 if target == torch.float32 else OUT_TOLERANCE[target]
    assert_close(out, ref, tol, f"M={m} N={n} K={x.shape[1]} {kwargs}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(LLAMA_8B_SHAPES))
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_gpu_llama_shapes_with_table_config(llama_weights, name, m):
    w = llama_weights[name]
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, w.shape[1], generator=gen, device="cuda").to(torch.bfloat16)
    out_dtype = torch.float32 if name == "lm_head" else None
    config = pick_config(m, *w.shape) or sg.DEFAULT_CONFIGS[16] or SkinnyConfig("dot", 32, 128, 4, 4)
    _gpu_check(x, w, None, out_dtype, config=config)


GPU_CONFIGS = [
    "fma:8x512:w4:p0", "fma:16x256:w4:p0", "fma:16x512:w8:p0", "fma:4x1024:w4:p0", "fma:8x512:w4:p4",
    "dot:32x128:w4:s4", "dot:16x256:w4:s4", "dot:64x128:w4:s4",
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("config", GPU_CONFIGS)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gpu_every_config_with_bias(config, m):
    """Every kind/knob (incl. the L2 prefetch) at an o_proj-like shape with a bias and an odd N."""
    gen = torch.Generator(device="cuda").manual_seed(m)
    n, k = 4104, 4096  # N: 4096 + 8 rows, a partial last block for every block_n
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen, device="cuda") * k**-0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=gen, device="cuda").to(torch.bfloat16)
    _gpu_check(x, w, b, None, config=SkinnyConfig.parse(config))


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["fma:8x512:w4:p2", "dot:32x128:w4:s4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_gpu_programmatic_dependent_launch(config, dtype, out_dtype):
    """PDL launches (weight loads before griddepcontrol.wait) right after a kernel that writes x: the GEMM must
    see the new x. fp16 and fp32 output too."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    n, k = 4104, 4096
    w = (torch.randn(n, k, generator=gen, device="cuda") * k**-0.5).to(dtype)
    b = torch.randn(n, generator=gen, device="cuda").to(dtype)
    x = torch.randn(4, k, generator=gen, device="cuda").to(dtype)
    for _ in range(3):
        out = torch.full((4, n), float("nan"), dtype=out_dtype or dtype, device="cuda")
        x.mul_(-1.5)  # the kernel just before the GEMM writes its input
        skinny_gemm(x, w, b, out_dtype, config=SkinnyConfig.parse(config), pdl=True, out=out)
        ref = x.double() @ w.double().T + b.double()
        assert_close(out, ref, 1e-4 if out_dtype == torch.float32 else OUT_TOLERANCE[dtype], f"PDL {config}")


@pytest.mark.gpu
def test_gpu_k_tail_and_row_stride():
    """K not a multiple of block_k (masked tail) and x rows that are a slice of a wider tensor."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    for config in ("fma:8x512:w4:p2", "dot:32x128:w4:s4"):
        x = torch.randn(4, 3000, generator=gen, device="cuda").to(torch.bfloat16)[:, :2056]
        w = (torch.randn(1000, 2056, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
        _gpu_check(x, w, None, None, config=SkinnyConfig.parse(config))


@pytest.mark.gpu
def test_gpu_dispatcher_routes_by_m_and_is_graph_safe(llama_weights):
    """M <= MAX_M takes Triton inside a CUDA graph with no host sync; larger M is cuBLAS, bit for bit."""
    w = llama_weights["o_proj"]
    gen = torch.Generator(device="cuda").manual_seed(9)
    big = torch.randn(sg.MAX_M + 1, w.shape[1], generator=gen, device="cuda").to(torch.bfloat16)
    assert torch.equal(linear(big, w), F.linear(big, w))
    x = torch.randn(1, w.shape[1], generator=gen, device="cuda").to(torch.bfloat16)
    lm = llama_weights["lm_head"]
    eager = linear(x, w), linear(x, lm, out_dtype=torch.float32)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            captured = linear(x, w), linear(x, lm, out_dtype=torch.float32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x.copy_(torch.randn(1, w.shape[1], generator=gen, device="cuda").to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert captured[1].dtype == torch.float32
    assert_close(captured[0], x.double() @ w.double().T, 1e-2, "graph o_proj")
    assert_close(captured[1], x.double() @ lm.double().T, 1e-4, "graph lm_head")
    assert not torch.equal(eager[0], captured[0])  # the replay used the new x
    expected_triton = sg.ENABLED and pick_config(1, *w.shape) is not None
    assert expected_triton or torch.equal(captured[0], linear_ref(x, w))


@pytest.mark.gpu
def test_gpu_linear_layer_uses_dispatcher():
    from core.layers.linear import Linear

    layer = Linear(256, 384, bias=True).cuda().to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(3)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(384, 256, generator=gen, device="cuda") * 0.06)
        layer.bias.copy_(torch.randn(384, generator=gen, device="cuda"))
    for m in (1, 5, 40):
        x = torch.randn(m, 256, generator=gen, device="cuda").to(torch.bfloat16)
        ref = x.double() @ layer.weight.double().T + layer.bias.double()
        assert_close(layer(x), ref, 1e-2, f"Linear M={m}")
