"""The one-launch MLP half (kernels/fp8_mlp_gluon.py: o_proj, the post-attention norm, gate_up and down as tasks of
one grid) against the chain of GEMV launches it replaces, and the rule for when it serves.

Gluon has no interpreter: the kernel tests are ``gpu`` tests."""

from __future__ import annotations

import pytest
import torch

from kernels.fp8_gemv_gluon import GemvConfig, gluon_fp8_gemv, gluon_fp8_gemv_silu_mul
from kernels.fp8_linear import fp8_linear_ref, quantize_per_channel
from kernels.fp8_mlp_gluon import MlpHalfConfig, gluon_fp8_mlp_half, mlp_half_supported
from kernels.gemv_rows_gluon import RowNorm
from kernels.task_order import task_counters
from tests.kernels.kernel_testing import outputs_with_configs

BF16 = torch.bfloat16
EPS = 1e-5
LLAMA_8B = (4096, 4096, 14336)  # hidden, q_size, intermediate
FOUR_WARPS = MlpHalfConfig(GemvConfig(4, 2), GemvConfig(4, 1), GemvConfig(4, 2, staged=1))


def _layer(m: int, hidden: int, q_size: int, inter: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    o_w, o_s = quantize_per_channel(randn(hidden, q_size) * 0.05)
    gu_w, gu_s = quantize_per_channel(randn(2 * inter, hidden) * 0.05)
    d_w, d_s = quantize_per_channel(randn(hidden, inter) * 0.05)
    return {"attn": randn(m, q_size).to(BF16), "residual": randn(m, hidden).to(BF16), "o_w": o_w, "o_s": o_s,
            "nw": (1 + 0.1 * randn(hidden)).to(BF16), "gu_w": gu_w, "gu_s": gu_s, "d_w": d_w, "d_s": d_s}


def _fused(p: dict, config: MlpHalfConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return gluon_fp8_mlp_half(p["attn"], p["residual"], p["o_w"], p["o_s"], p["nw"], EPS, p["gu_w"], p["gu_s"],
                              p["d_w"], p["d_s"], config)  # fmt: skip


def _chain(p: dict, config: MlpHalfConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The same work as three GEMV launches at the same configs: o_proj quantizing its rows once, gate_up norming
    them (the same ``_norm_rows_once``) with the SiLU-and-mul epilogue, down quantizing once."""
    o = gluon_fp8_gemv(p["attn"], p["o_w"], p["o_s"], config=config.o._replace(quantize_once=True))
    res_out = torch.empty_like(p["residual"])
    h = gluon_fp8_gemv_silu_mul(o, None, p["gu_w"], p["gu_s"], BF16, config.gate_up._replace(quantize_once=True),
                                norm=RowNorm(p["nw"], EPS, p["residual"], res_out))  # fmt: skip
    return gluon_fp8_gemv(h, p["d_w"], p["d_s"], config=config.down._replace(quantize_once=True)), res_out


def _where_they_differ(a: torch.Tensor, b: torch.Tensor) -> str:
    rows, cols = torch.nonzero(a != b, as_tuple=True)
    return f"{rows.numel()} of {a.numel()} differ: rows {rows.unique().tolist()}, columns {cols.unique()[:16].tolist()}"


def _reference(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """W8A8 in float32 (``fp8_linear_ref``), the norm with ``kernels/rmsnorm.py``'s roundings."""
    summed = (fp8_linear_ref(p["attn"], p["o_w"], p["o_s"]).float() + p["residual"].float()).to(BF16)
    x = summed.float()
    normed = ((x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)).to(BF16).float() * p["nw"].float()).to(BF16)
    gate, up = fp8_linear_ref(normed, p["gu_w"], p["gu_s"]).float().chunk(2, dim=-1)
    h = (torch.nn.functional.silu(gate) * up).to(BF16)
    return fp8_linear_ref(h, p["d_w"], p["d_s"]), summed


def test_mlp_half_is_declined_on_cpu():
    x = torch.zeros(1, 64, dtype=BF16)
    w = torch.zeros(64, 64, dtype=torch.float8_e4m3fn)
    assert not mlp_half_supported(x, w, torch.zeros(128, 64, dtype=torch.float8_e4m3fn), w)


def test_one_warp_count_per_launch():
    """The tasks share one launch, so one ``num_warps``: mixed configs are refused by name."""
    x = torch.zeros(1, 64, dtype=BF16)
    w = torch.zeros(64, 64, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="one warp count"):
        gluon_fp8_mlp_half(x, x, w, x, x[0], EPS, w, x, w, x, MlpHalfConfig(GemvConfig(8, 2), GemvConfig(4, 2)))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("shape, config", [(LLAMA_8B, MlpHalfConfig()), ((1024, 2048, 1040), FOUR_WARPS)],
                         ids=["llama-8b", "uneven-k"])
def test_gpu_mlp_half_gives_the_bits_of_the_gemv_chain(m, shape, config):
    """Eager, no PDL: the launch's output and next residual are those of the three GEMV launches, bit for bit (the
    same program bodies; a counter in place of each boundary); K not whole steps too (1040: no preload)."""
    p = _layer(m, *shape, seed=m)
    out, res_out = _fused(p, config)
    chain_out, chain_res = _chain(p, config)
    assert torch.equal(res_out, chain_res)
    assert torch.equal(out, chain_out), _where_they_differ(out, chain_out)
    ref_out, ref_res = _reference(p)
    # two e4m3 quantizations in a row (the normed rows, then SiLU-and-mul's): a bf16 rounding of the norm apart
    # moves the output ~3% (on the CPU, fp8_linear_ref throughout), so the float reference is a loose check; the
    # chain's bits are the exact one
    assert ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item() < 6e-2
    # o_proj's output (its GEMV adds in another order than the reference's matmul) rounded to bf16, plus the residual
    assert ((res_out.float() - ref_res.float()).norm() / ref_res.float().norm()).item() < 1e-2
    assert not task_counters(out.device).any()  # reset by the last task for the next launch


@pytest.mark.gpu
def test_gpu_mlp_half_and_the_chain_are_deterministic():
    """Eight rows, K not whole steps, five launches of each: every launch gives its first one's bits."""
    p = _layer(8, 1024, 2048, 1040, seed=8)
    fused = [_fused(p, FOUR_WARPS)[0] for _ in range(5)]
    chain = [_chain(p, FOUR_WARPS)[0] for _ in range(5)]
    assert all(torch.equal(fused[0], out) for out in fused), [_where_they_differ(fused[0], out) for out in fused]
    assert all(torch.equal(chain[0], out) for out in chain), [_where_they_differ(chain[0], out) for out in chain]
    assert torch.equal(fused[0], chain[0]), _where_they_differ(fused[0], chain[0])


@pytest.mark.gpu
def test_gpu_mlp_half_back_to_back_launches():
    """Twenty launches in a row on new inputs, no synchronization between them: each one's counters start from
    zero (the last task of the one before reset them) and each gives the chain's bits."""
    problems = [_layer(1, 1024, 2048, 1040, seed=100 + i) for i in range(20)]
    fused = [_fused(p, FOUR_WARPS)[0] for p in problems]
    for p, out in zip(problems, fused):
        assert torch.equal(out, _chain(p, FOUR_WARPS)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("config", [MlpHalfConfig(), MlpHalfConfig(GemvConfig(8, 4), GemvConfig(8, 1),
                                                                   GemvConfig(8, 2))], ids=["default", "o-8x4"])
def test_gpu_mlp_half_with_pdl_in_a_cuda_graph(config):
    """As a decode step runs it: with PDL behind the kernel that writes attention's output, replayed in a CUDA
    graph (weight preloaded before the counter waits): the eager launch's bits."""
    p = _layer(1, *LLAMA_8B, seed=7)
    src = p["attn"].clone()
    p["attn"].zero_()

    def step(_):
        p["attn"].copy_(src)
        return torch.cat(_fused(p, config), dim=-1)

    replayed = outputs_with_configs([None], step)[0]
    assert torch.equal(replayed, torch.cat(_fused(p, config), dim=-1))
