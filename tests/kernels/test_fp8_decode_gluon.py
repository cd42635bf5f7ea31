"""The Gluon decode kernel for an fp8 cache (kernels/fp8_decode_gluon.py) against the float64 reference on the
dequantized cache, and when ``paged_decode_attention`` hands a call to it.

Gluon has no interpreter: the kernel tests are ``gpu`` tests. On the CPU, the ``"gluon"`` read path falls back to the
Triton kernel (``test_kv_fp8_read_paths.py`` runs it there with every other path)."""

from __future__ import annotations

import pytest
import torch

import kernels.decode_attention as decode_attention
from kernels.attention_common import FP8_KV_DTYPE, fp8_read_flags
from kernels.decode_attention import DecodeConfig, decode_order, paged_decode_attention
from kernels.fp8_decode_gluon import gluon_decode_supported, gluon_fp8_decode
from tests.kernels.kernel_testing import ATTENTION_TOLERANCE, BF16, F16, assert_close, poisoned_like
from tests.kernels.test_kv_cache_fp8 import _fp8_problem, _reference

GLUON = DecodeConfig(tile_n=128, num_warps=4, num_stages=3, order="lpt", fused_reduce=False, fp8_path="gluon")
# context lengths within one 64-key tile (16 keys a warp), around 2 tiles and 32 keys, and past the 16-slot pages
LENGTHS = [1, 5, 31, 32, 33, 127, 128, 129, 200, 1000]


def test_gluon_path_is_declined_on_cpu_and_reads_as_vsplit():
    q = torch.zeros(2, 4, 128, dtype=BF16)
    fp8 = torch.zeros(3, 16, 2, 128, dtype=FP8_KV_DTYPE)
    assert not gluon_decode_supported(q, fp8)
    assert fp8_read_flags(q, fp8, fp8, "gluon") == fp8_read_flags(q, fp8, fp8, "f16-vsplit")


@pytest.mark.parametrize("hip, capability, served", [(None, (9, 0), True), (None, (8, 9), True),
                                                     (None, (8, 6), False), ("6.2", (9, 4), False)])  # fmt: skip
def test_gluon_needs_an_nvidia_gpu_with_packed_e4m3(monkeypatch, hip, capability, served):
    """The device rule without a GPU: compute capability 8.9+ (packed e4m3 -> fp16), and not ROCm (whose tensors are
    also "cuda" and whose GPUs report capabilities of 9+), whose Gluon has no mma.sync or cp.async."""
    import kernels.fp8_decode_gluon as gluon_module

    class OnGpu:  # the attributes the rule reads, as a CUDA tensor would have them
        def __init__(self, tensor):
            self.is_cuda, self.dtype, self.shape, self.device = True, tensor.dtype, tensor.shape, "cuda:0"

    monkeypatch.setattr(gluon_module, "HAS_GLUON", True)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    q = OnGpu(torch.zeros(2, 32, 128, dtype=BF16))
    fp8 = OnGpu(torch.zeros(3, 16, 8, 128, dtype=FP8_KV_DTYPE))
    assert gluon_decode_supported(q, fp8) is served


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(8, 8), (16, 8), (32, 8), (64, 8), (12, 4)])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_gpu_gluon_decode_matches_reference(heads, dtype):
    """Query groups of 1 to 8 heads, fp16 and bf16 queries, scales that are not 1, lengths around the tiles."""
    problem, k64, v64 = _fp8_problem([1] * len(LENGTHS), LENGTHS, heads, 128, dtype, 31, 0.1, 2.0, device="cuda")
    out = poisoned_like(problem.q)
    gluon_fp8_decode(*problem.args(), out=out, seq_order=decode_order(problem.seq_lens), k_scale=0.1, v_scale=2.0)
    assert_close(out, _reference(problem, k64, v64), ATTENTION_TOLERANCE[dtype], f"gluon heads={heads}")


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [8, 32])
def test_gpu_gluon_decode_block_sizes(block_size):
    """Blocks of 16+ slots hold a warp's keys of a tile (one table lookup per warp), blocks of 8 do not (one per key)."""
    problem, k64, v64 = _fp8_problem([1] * len(LENGTHS), LENGTHS, (32, 8), 128, BF16, 36, 1.0, 1.0, device="cuda",
                                     block_size=block_size)  # fmt: skip
    out = gluon_fp8_decode(*problem.args(), out=poisoned_like(problem.q), seq_order=decode_order(problem.seq_lens))
    assert_close(out, _reference(problem, k64, v64), ATTENTION_TOLERANCE[BF16], f"gluon block size {block_size}")


@pytest.mark.gpu
def test_gpu_gluon_decode_zero_length_rows_and_launch_order():
    """A sequence of length 0 (CUDA-graph padding) gets zero rows; the result does not depend on the launch order."""
    problem, k64, v64 = _fp8_problem([1] * 4, [40, 300, 7, 129], (32, 8), 128, BF16, 32, 1.0, 1.0, device="cuda")
    ref = _reference(problem, k64, v64)
    first = gluon_fp8_decode(*problem.args(), out=poisoned_like(problem.q),
                             seq_order=torch.arange(4, dtype=torch.int32, device="cuda"))  # fmt: skip
    again = gluon_fp8_decode(*problem.args(), out=poisoned_like(problem.q),
                             seq_order=torch.tensor([3, 1, 0, 2], dtype=torch.int32, device="cuda"))  # fmt: skip
    assert_close(first, ref, ATTENTION_TOLERANCE[BF16], "gluon in batch order")
    assert torch.equal(first, again)
    problem.seq_lens[2] = 0
    out = gluon_fp8_decode(*problem.args(), out=poisoned_like(problem.q), seq_order=decode_order(problem.seq_lens))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert_close(out[[0, 1, 3]], ref[[0, 1, 3]], ATTENTION_TOLERANCE[BF16], "gluon beside an empty sequence")


@pytest.mark.gpu
def test_gpu_gluon_decode_queries_beyond_fp16_range():
    """bf16 queries of 3e5 on a dimension whose keys are zero: q is rescaled by a power of two before its fp16 cast
    and the scores after the dot, so the result is finite and right."""
    problem, _, v64 = _fp8_problem([1] * 3, [40, 7, 300], (32, 8), 128, BF16, 33, 1.0, 1.0, device="cuda")
    problem.k_cache[..., 0] = 0.0
    problem.q[:, :, 0] = 3e5
    out = gluon_fp8_decode(*problem.args(), out=poisoned_like(problem.q), seq_order=decode_order(problem.seq_lens))
    assert torch.isfinite(out).all()
    assert_close(out, _reference(problem, problem.k_cache.double(), v64), ATTENTION_TOLERANCE[BF16], "|q| = 3e5")


@pytest.mark.gpu
def test_gpu_paged_decode_hands_supported_calls_to_gluon(monkeypatch):
    """With ``fp8_path="gluon"`` an unsplit plain decode runs the Gluon kernel; a split context, soft-capping or a
    verify step's several query rows run the Triton kernel, and every result matches the reference."""
    calls = []
    monkeypatch.setattr(decode_attention, "gluon_fp8_decode",
                        lambda *a, **kw: calls.append(1) or gluon_fp8_decode(*a, **kw))  # fmt: skip
    problem, k64, v64 = _fp8_problem([1] * 6, [9, 400, 33, 128, 900, 2], (32, 8), 128, BF16, 34, 0.5, 0.5,
                                     device="cuda")  # fmt: skip
    args = dict(k_scale=0.5, v_scale=0.5, config=GLUON)
    out = paged_decode_attention(*problem.args(), out=poisoned_like(problem.q), num_splits=1, **args)
    assert calls == [1]
    assert_close(out, _reference(problem, k64, v64), ATTENTION_TOLERANCE[BF16], "gluon through paged_decode")
    out = paged_decode_attention(*problem.args(), out=poisoned_like(problem.q), num_splits=3, **args)
    out_cap = paged_decode_attention(*problem.args(), out=poisoned_like(problem.q), num_splits=1, softcap=5.0, **args)
    assert calls == [1]
    assert_close(out, _reference(problem, k64, v64), ATTENTION_TOLERANCE[BF16], "split: Triton kernel")
    assert_close(out_cap, _reference(problem, k64, v64, softcap=5.0), ATTENTION_TOLERANCE[BF16], "softcap: Triton")


@pytest.mark.gpu
@pytest.mark.parametrize("enable_pdl", [False, True])
def test_gpu_gluon_decode_replays_in_a_cuda_graph(monkeypatch, enable_pdl):
    """Replayed in a graph, also launched with PDL behind the kernel that writes its queries (it waits for them)."""
    from core.cuda_graphs import capture_after_warmup
    from kernels import pdl

    if enable_pdl and not pdl.pdl_supported(0):
        pytest.skip("programmatic dependent launch needs Hopper (sm_90+) and Triton's griddepcontrol")
    monkeypatch.setattr(pdl, "ENABLED", enable_pdl)
    problem, k64, v64 = _fp8_problem([1] * 5, [3, 150, 77, 600, 31], (16, 8), 128, BF16, 35, 1.0, 1.0, device="cuda")
    queries = problem.q.clone()
    out = poisoned_like(problem.q)
    order = decode_order(problem.seq_lens)

    def step():
        problem.q.copy_(queries * 2.0)  # the kernel before writes q
        gluon_fp8_decode(*problem.args(), out=out, seq_order=order)

    graph = capture_after_warmup(step)
    problem.q.fill_(float("nan"))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, _reference(problem, k64, v64), ATTENTION_TOLERANCE[BF16], f"gluon replayed, pdl={enable_pdl}")


@pytest.mark.gpu
def test_gpu_supported_needs_head_dim_128_small_groups_and_plain_decode():
    q = torch.zeros(2, 32, 128, dtype=BF16, device="cuda")
    fp8 = torch.zeros(3, 16, 8, 128, dtype=FP8_KV_DTYPE, device="cuda")
    assert gluon_decode_supported(q, fp8)
    assert not gluon_decode_supported(q, fp8.to(BF16))
    assert not gluon_decode_supported(q.float(), fp8)
    assert not gluon_decode_supported(q, fp8, queries=2)
    assert not gluon_decode_supported(q, fp8, softcap=30.0)
    assert not gluon_decode_supported(q, fp8, sliding_window=64)
    assert not gluon_decode_supported(torch.zeros(2, 32, 64, dtype=BF16, device="cuda"), fp8[..., :64])
    assert gluon_decode_supported(torch.zeros(2, 16, 128, dtype=BF16, device="cuda"), fp8[:, :, :2])  # group 8
    assert not gluon_decode_supported(torch.zeros(2, 32, 128, dtype=BF16, device="cuda"), fp8[:, :, :2])  # 16
