"""The Gluon fp8 decode GEMM (kernels/fp8_gemv_gluon.py) against the W8A8 reference, and the rule for when it
serves a call.

Gluon has no interpreter: the kernel tests are ``gpu`` tests; on the CPU the Triton decode kernels run
(``test_fp8_linear.py``)."""

from __future__ import annotations

import pytest
import torch

from kernels import pdl
from kernels.activation import silu_and_mul_triton
from kernels.attention_prep import attention_prep_triton
from kernels.fp8_gemv_gluon import (
    GemvConfig,
    gemv_supported,
    gluon_fp8_gemv,
    gluon_fp8_gemv_rope_cache,
    gluon_fp8_gemv_silu_mul,
    prologue_steps,
)
from kernels.fp8_linear import fp8_linear_ref, quantize_activations, quantize_per_channel
from kernels.gemv_rows_gluon import RowNorm, rope_cache_supported, silu_mul_supported
from tests.kernels.kernel_testing import (FakeCudaTensor, assert_rope_cache_matches, outputs_with_configs,
                                          outputs_with_each_preload, rope_cache_problem)

BF16 = torch.bfloat16


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_gemv_is_declined_on_cpu():
    x = torch.zeros(1, 64, dtype=BF16)
    w = torch.zeros(32, 64, dtype=torch.float8_e4m3fn)
    assert not gemv_supported(x, w)


@pytest.mark.parametrize("hip, capability, rows, k, served", [
    (None, (9, 0), 1, 4096, True), (None, (8, 9), 8, 4096, True), (None, (9, 0), 9, 4096, False),
    (None, (9, 0), 1, 4104, False), (None, (8, 6), 1, 4096, False), ("6.2", (9, 4), 1, 4096, False),
])  # fmt: skip
def test_gemv_device_and_shape_rule(monkeypatch, hip, capability, rows, k, served):
    """Compute capability 8.9+ and not ROCm, at most 8 rows, K a multiple of 16 (16-byte loads)."""
    import kernels.fp8_gemv_gluon as gemv_module

    monkeypatch.setattr(gemv_module, "HAS_GLUON", True)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    gemv_module._has_fp8_conversions.cache_clear()  # asked once per device: forget the real (or last) answer
    try:
        assert gemv_supported(FakeCudaTensor((rows, k)), FakeCudaTensor((4096, k))) is served
    finally:
        gemv_module._has_fp8_conversions.cache_clear()


def _problem(m: int, n: int, k: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w, w_scale = quantize_per_channel(torch.randn(n, k, device="cuda", generator=gen) * 0.05)
    x = torch.randn(m, k, device="cuda", generator=gen).to(BF16)
    return x, w, w_scale


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 14336), (100, 4096), (48, 4112)])
@pytest.mark.parametrize("config", [GemvConfig(4, 1), GemvConfig(4, 2), GemvConfig(8, 4)], ids=repr)
def test_gpu_gemv_matches_w8a8_reference(m, n, k, config):
    """Pre-quantized rows (``Fp8Activations``): row tails (N not a multiple of 16), K not a multiple of a step."""
    x, w, w_scale = _problem(m, n, k)
    xq, x_scale = quantize_activations(x)
    out = gluon_fp8_gemv(xq, w, w_scale, x_scale=x_scale, out_dtype=BF16, config=config)
    assert out.shape == (m, n) and out.dtype == BF16
    assert _rel_err(out, fp8_linear_ref(x, w, w_scale)) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n, k", [(4096, 4096), (100, 4112), (64, 2000)])
@pytest.mark.parametrize("config", [GemvConfig(4, 2), GemvConfig(8, 4), GemvConfig(16, 2)], ids=repr)
def test_gpu_gemv_quantizes_rows_itself(m, n, k, config):
    """bf16 rows quantized per token inside the kernel, over several steps or (K within one step: 8 x 4 and
    16 x 2 chunks at K = 4096 and 2000) in registers: the W8A8 reference's numerics, x's dtype out."""
    x, w, w_scale = _problem(m, n, k, seed=1)
    x[0, 7] = 30.0  # one outlier sets row 0's scale
    out = gluon_fp8_gemv(x, w, w_scale, config=config)
    assert out.dtype == BF16
    assert _rel_err(out, fp8_linear_ref(x, w, w_scale)) < 5e-3


@pytest.mark.gpu
def test_gpu_gemv_with_pdl_in_a_cuda_graph():
    """Launched with PDL behind the kernel that writes x, replayed in a CUDA graph: it waits for x."""
    x, w, w_scale = _problem(1, 4096, 4096, seed=2)
    src = torch.randn_like(x)
    pdl.configure(True)
    try:
        def step():
            x.copy_(src * 2.0)
            return gluon_fp8_gemv(x, w, w_scale)

        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        src.normal_()
        graph.replay()
        torch.cuda.synchronize()
    finally:
        pdl.configure(False)
    assert _rel_err(out, fp8_linear_ref(src * 2.0, w, w_scale)) < 5e-3


@pytest.mark.parametrize("config, k, single_step, pdl, expected", [
    (GemvConfig(4, 4), 4096, False, True, (2, 0)),  # qkv at 2 KB a step: both steps in registers
    (GemvConfig(4, 4, preload=1), 4096, False, True, (1, 0)),
    (GemvConfig(8, 4), 4096, False, True, (1, 0)),  # one step is the whole row
    (GemvConfig(4, 4), 4112, False, True, (0, 1)),  # K not whole steps: L2 is asked instead
    (GemvConfig(4, 4, preload=0), 4096, False, True, (0, 1)),
    (GemvConfig(8, 1, preload=0, staged=4), 4096, False, True, (0, 0)),  # staged: already on its way
    (GemvConfig(8, 2, quantize_x=True), 2048, True, True, (0, 0)),  # single step: loaded before the wait anyway
    (GemvConfig(4, 4), 4096, False, False, (0, 0)),  # no PDL: nothing to overlap
])
def test_prologue_steps_rule(config, k, single_step, pdl, expected):
    assert prologue_steps(config, k, single_step, pdl) == expected


def _gemv_step(n: int, k: int, quant_x: bool, seed: int):
    """A GEMV call as a function of its config, its rows rewritten first (as the kernel before it would in a CUDA
    graph): bf16 rows quantized in the kernel (``quant_x``) or e4m3 rows with their scales; and its reference."""
    x, w, w_scale = _problem(3, n, k, seed=seed)
    src = torch.randn_like(x)
    xq, x_scale = quantize_activations(src)
    xq_in = torch.empty_like(xq)

    def step(cfg: GemvConfig) -> torch.Tensor:
        if quant_x:
            x.copy_(src)
            return gluon_fp8_gemv(x, w, w_scale, config=cfg)
        xq_in.copy_(xq)
        return gluon_fp8_gemv(xq_in, w, w_scale, x_scale=x_scale, out_dtype=BF16, config=cfg)

    return step, fp8_linear_ref(src, w, w_scale)


PROLOGUE_SHAPES = [(6144, 4096, GemvConfig(4, 4)), (4096, 14336, GemvConfig(8, 2)), (100, 4096, GemvConfig(4, 1)),
                   (48, 4112, GemvConfig(4, 2))]


@pytest.mark.gpu
@pytest.mark.parametrize("n, k, config", PROLOGUE_SHAPES, ids=str)
@pytest.mark.parametrize("quant_x", [False, True])
def test_gpu_gemv_preload_changes_no_bit_in_a_cuda_graph(n, k, config, quant_x):
    """Steps of weight loaded before the PDL wait (and multiplied after it) give the loop's bits exactly, in a CUDA
    graph behind the kernel that writes x; K not whole steps (4112) takes the L2 path."""
    step, ref = _gemv_step(n, k, quant_x, seed=3)
    outs = outputs_with_each_preload(config, step)
    assert _rel_err(outs[0], ref) < 5e-3
    assert all(torch.equal(outs[0], out) for out in outs[1:])


@pytest.mark.gpu
@pytest.mark.parametrize("n, k, config", PROLOGUE_SHAPES, ids=str)
@pytest.mark.parametrize("quant_x", [False, True])
def test_gpu_gemv_staged_steps_change_no_bit(n, k, config, quant_x):
    """1-3 steps of weight staged in shared memory (after 0 or 2 in registers, all issued before the PDL wait) give
    the register loop's bits exactly, in a CUDA graph behind the kernel that writes x, and launched without PDL;
    K not whole steps (4112) masks the staged copies past K."""
    step, ref = _gemv_step(n, k, quant_x, seed=4)
    configs = [config] + [config._replace(preload=p, staged=r) for p in (0, 2) for r in (1, 2, 3)]
    outs = outputs_with_configs(configs, step)
    assert _rel_err(outs[0], ref) < 5e-3
    assert all(torch.equal(outs[0], out) for out in outs[1:])
    assert torch.equal(step(config._replace(staged=2)), outs[0])  # no PDL


@pytest.mark.gpu
@pytest.mark.parametrize("n, k, config", PROLOGUE_SHAPES, ids=str)
def test_gpu_gemv_quantizing_rows_once_changes_no_bit(n, k, config):
    """bf16 rows quantized once per program into a scratch row after the wait (``quantize_once``; 8 programs share
    one at N = 4096) give the bits of rows quantized in the loop, with steps preloaded or staged before the wait,
    in a CUDA graph behind the kernel that writes x, and launched without PDL; K not whole steps (4112) too."""
    step, ref = _gemv_step(n, k, True, seed=5)
    once = config._replace(quantize_once=True)
    configs = [config, once, once._replace(preload=0), once._replace(staged=1), once._replace(preload=0, staged=2)]
    outs = outputs_with_configs(configs, step)
    assert _rel_err(outs[0], ref) < 5e-3
    assert all(torch.equal(outs[0], out) for out in outs[1:])
    assert torch.equal(step(once), outs[0])  # no PDL


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 8])
def test_gpu_gemv_quantizing_rows_once_matches_upstream_quantization(m):
    """Each token row gets its own scale: the bits of ``quantize_activations`` then the GEMV, at 1-8 rows with an
    outlier in one row."""
    x, w, w_scale = _problem(m, 4096, 14336, seed=6)
    x[m - 1, 11] = 40.0
    xq, x_scale = quantize_activations(x)
    upstream = gluon_fp8_gemv(xq, w, w_scale, x_scale=x_scale, out_dtype=BF16, config=GemvConfig(8, 2))
    assert torch.equal(gluon_fp8_gemv(x, w, w_scale, config=GemvConfig(8, 2, quantize_once=True)), upstream)


@pytest.mark.parametrize("n, served", [(28672, True), (2000, True), (2008, False)])
def test_silu_mul_rule(n, served):
    """The SiLU-and-mul epilogue pairs 8 gate rows with their 8 up rows in a program: halves of whole 8-row groups."""
    assert silu_mul_supported(torch.empty(n, 0)) is served


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("d, k", [(14336, 4096), (1000, 2048), (64, 4112)])
@pytest.mark.parametrize("config", [GemvConfig(4, 2), GemvConfig(8, 1)], ids=repr)
def test_gpu_gemv_silu_mul_matches_projection_then_activation(m, d, k, config):
    """``silu_and_mul`` in the gate_up GEMV's epilogue: the bits of the GEMV's ``[gate | up]`` output then the
    SiLU-and-mul kernel."""
    x, w, w_scale = _problem(m, 2 * d, k, seed=7)
    xq, x_scale = quantize_activations(x)
    gate_up = gluon_fp8_gemv(xq, w, w_scale, x_scale=x_scale, out_dtype=BF16, config=config)
    out = gluon_fp8_gemv_silu_mul(xq, x_scale, w, w_scale, BF16, config)
    assert out.shape == (m, d) and out.dtype == BF16
    assert torch.equal(out, silu_and_mul_triton(gate_up))


@pytest.mark.gpu
def test_gpu_silu_mul_then_down_in_a_cuda_graph():
    """The fused pair as a decode step runs it, with PDL in a CUDA graph: gate_up with the SiLU epilogue, then down
    quantizing its rows once, the bits of the three-kernel path (GEMV, ``silu_and_mul_fp8``, GEMV)."""
    from kernels.activation import silu_and_mul_fp8

    x, w_gu, s_gu = _problem(1, 2 * 2048, 1024, seed=8)
    _, w_down, s_down = _problem(1, 1024, 2048, seed=9)  # K over one step: not the single-step path
    xq, x_scale = quantize_activations(x)
    xq_in = torch.empty_like(xq)
    gu, down = GemvConfig(4, 2), GemvConfig(4, 2, quantize_once=True)

    def fused(_):
        xq_in.copy_(xq)
        h = gluon_fp8_gemv_silu_mul(xq_in, x_scale, w_gu, s_gu, BF16, gu)
        return gluon_fp8_gemv(h, w_down, s_down, config=down)

    def unfused():
        act = silu_and_mul_fp8(gluon_fp8_gemv(xq, w_gu, s_gu, x_scale=x_scale, out_dtype=BF16, config=gu))
        return gluon_fp8_gemv(act.xq, w_down, s_down, x_scale=act.scale, out_dtype=BF16, config=gu)

    assert torch.equal(outputs_with_configs([None], fused)[0], unfused())


@pytest.mark.parametrize("head_dim, rotary_dim, kv_rows, cache_dtype, served", [
    (128, 128, 1024, BF16, True), (64, 64, 512, BF16, True), (80, 80, 640, BF16, True),
    (72, 72, 576, BF16, False), (128, 64, 1024, BF16, False), (128, 128, 1024, torch.float8_e4m3fn, False),
])  # fmt: skip
def test_rope_cache_rule(head_dim, rotary_dim, kv_rows, cache_dtype, served):
    """The fused prep needs heads the 16-row programs tile in rotary pairs (head dim a multiple of 16), full
    rotary, and a cache of the model's dtype (an fp8 cache keeps the prep kernel and its scales)."""
    assert rope_cache_supported(head_dim, rotary_dim, 32 * head_dim, kv_rows, BF16, cache_dtype) is served


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(32, 8, 128), (8, 2, 64), (4, 4, 80)])
@pytest.mark.parametrize("config", [GemvConfig(4, 1), GemvConfig(4, 4)], ids=repr)
def test_gpu_gemv_rope_cache_matches_projection_then_prep(m, num_heads, num_kv_heads, head_dim, config):
    """The qkv GEMM with the prep in its epilogue against the GEMM and then the prep kernel: the same q, the same
    keys and values in the cache slots of the batch (a padding token's slot -1 writes nothing), the rest of the
    cache untouched."""
    q_rows, kv_rows = num_heads * head_dim, num_kv_heads * head_dim
    x, w, w_scale = _problem(m, q_rows + 2 * kv_rows, 4096, seed=3)
    xq, x_scale = quantize_activations(x)
    cos_sin, positions, slots, caches = rope_cache_problem(m, num_kv_heads, head_dim, seed=4)
    fused_caches = [c.clone() for c in caches]

    qkv = gluon_fp8_gemv(xq, w, w_scale, x_scale=x_scale, out_dtype=BF16, config=config)
    q, k, v = qkv.split([q_rows, kv_rows, kv_rows], dim=-1)
    q = attention_prep_triton(positions, q.reshape(m, num_heads, head_dim), k.reshape(m, num_kv_heads, head_dim),
                              v.reshape(m, num_kv_heads, head_dim), cos_sin, *caches, slots)  # fmt: skip
    fused_q = gluon_fp8_gemv_rope_cache(xq, x_scale, w, w_scale, positions, cos_sin, *fused_caches, slots, q_rows,
                                        kv_rows, head_dim, BF16, config)  # fmt: skip
    assert_rope_cache_matches(fused_q, q, fused_caches, caches, slots)


def _norm_problem(m: int, k: int, seed: int, with_residual: bool):
    """Rows, a residual (or None) and an RMSNorm weight as a decoder layer's input norm sees them."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(m, k, device="cuda", generator=gen) * 2.0).to(BF16)
    residual = (torch.randn(m, k, device="cuda", generator=gen) * 4.0).to(BF16) if with_residual else None
    weight = (1.0 + 0.1 * torch.randn(k, device="cuda", generator=gen)).to(BF16)
    return x, residual, weight


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n, k", [(6144, 4096), (100, 4112)])
@pytest.mark.parametrize("with_residual", [True, False], ids=["add", "first-layer"])
def test_gpu_gemv_norms_its_rows_as_the_rmsnorm_kernel(m, n, k, with_residual):
    """The RMSNorm prologue (``norm``): the GEMV of ``rms_norm_fp8``'s rows within rounding (only the sum of squares
    is added in another order), and ``x + residual`` stored bit for bit, the residual itself untouched."""
    from kernels.rmsnorm import rms_norm_fp8

    x, residual, weight = _norm_problem(m, k, 10, with_residual)
    _, w, w_scale = _problem(m, n, k, seed=11)
    residual_out = torch.empty_like(x) if with_residual else None
    kept = None if residual is None else residual.clone()
    config = GemvConfig(4, 4, preload=1, staged=1, quantize_once=True)
    out = gluon_fp8_gemv(x, w, w_scale, config=config, norm=RowNorm(weight, 1e-5, residual, residual_out))
    acts, summed = rms_norm_fp8(x.clone(), weight, 1e-5, None if residual is None else residual.clone())
    ref = gluon_fp8_gemv(acts.xq, w, w_scale, x_scale=acts.scale, out_dtype=BF16, config=config)
    assert _rel_err(out, ref) < 2e-3
    if with_residual:
        assert torch.equal(residual_out, summed) and torch.equal(residual, kept)


@pytest.mark.gpu
def test_gpu_gemv_norm_prologue_changes_no_bit_with_the_prologue_steps():
    """With PDL in a CUDA graph behind the kernel that writes x: the same bits whatever is loaded before the wait
    (steps in registers, staged, nothing) and launched without PDL."""
    x, residual, weight = _norm_problem(2, 4096, 12, True)
    _, w, w_scale = _problem(2, 6144, 4096, seed=13)
    src, residual_out = x.clone(), torch.empty_like(x)
    norm = RowNorm(weight, 1e-5, residual, residual_out)

    def step(cfg):
        x.copy_(src)
        return gluon_fp8_gemv(x, w, w_scale, config=cfg, norm=norm)

    base = GemvConfig(4, 4, quantize_once=True)
    configs = [base, base._replace(preload=1, staged=1), base._replace(preload=0), base._replace(preload=0, staged=2)]
    outs = outputs_with_configs(configs, step)
    assert all(torch.equal(outs[0], out) for out in outs[1:])
    assert torch.equal(step(configs[1]), outs[0])  # no PDL


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3])
def test_gpu_gemv_rope_cache_with_the_norm_prologue_matches_norm_then_fused(m):
    """The qkv GEMV that norms its rows, rotates q and k and writes the cache: q and the caches of the RMSNorm kernel
    then the qkv GEMV with the prep epilogue, within rounding."""
    from kernels.rmsnorm import rms_norm_fp8

    num_heads, num_kv_heads, head_dim = 32, 8, 128
    q_rows, kv_rows = num_heads * head_dim, num_kv_heads * head_dim
    x, residual, weight = _norm_problem(m, 4096, 14, True)
    _, w, w_scale = _problem(m, q_rows + 2 * kv_rows, 4096, seed=15)
    cos_sin, positions, slots, caches = rope_cache_problem(m, num_kv_heads, head_dim, seed=16)
    fused_caches = [c.clone() for c in caches]
    config = GemvConfig(4, 4, preload=1, staged=1, quantize_once=True)
    norm = RowNorm(weight, 1e-5, residual, torch.empty_like(x))
    fused_q = gluon_fp8_gemv_rope_cache(x, None, w, w_scale, positions, cos_sin, *fused_caches, slots, q_rows, kv_rows,
                                        head_dim, BF16, config, norm=norm)  # fmt: skip
    acts, _ = rms_norm_fp8(x.clone(), weight, 1e-5, residual.clone())
    q = gluon_fp8_gemv_rope_cache(acts.xq, acts.scale, w, w_scale, positions, cos_sin, *caches, slots, q_rows, kv_rows,
                                  head_dim, BF16, config)  # fmt: skip
    assert_rope_cache_matches(fused_q, q, fused_caches, caches, slots)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3])
def test_gpu_gemv_silu_mul_with_the_norm_prologue_matches_norm_then_fused(m):
    """gate_up norming its rows (the post-attention norm) with the SiLU-and-mul epilogue: the RMSNorm kernel then
    the fused GEMV within rounding, and ``x + residual`` stored bit for bit."""
    from kernels.rmsnorm import rms_norm_fp8

    x, residual, weight = _norm_problem(m, 4096, 17, True)
    _, w, w_scale = _problem(m, 2 * 2048, 4096, seed=18)
    config = GemvConfig(4, 2, quantize_once=True)
    norm = RowNorm(weight, 1e-5, residual, torch.empty_like(x))
    out = gluon_fp8_gemv_silu_mul(x, None, w, w_scale, BF16, config, norm=norm)
    acts, summed = rms_norm_fp8(x.clone(), weight, 1e-5, residual.clone())
    ref = gluon_fp8_gemv_silu_mul(acts.xq, acts.scale, w, w_scale, BF16, config)
    assert _rel_err(out, ref) < 2e-3
    assert torch.equal(norm.residual_out, summed)
