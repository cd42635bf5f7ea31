"""On CUDA every dispatcher takes its Triton kernel, and none synchronizes with the host (CUDA-graph safe)."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul
from kernels.attention_prep import attention_prep
from kernels.cache_write import write_kv_cache
from kernels.paged_attention import paged_attention
from kernels.rmsnorm import rms_norm
from kernels.rotary import rotary_embedding
from tests.kernels.kernel_testing import make_attention_problem


@pytest.mark.gpu
def test_gpu_dispatchers_run_without_host_sync():
    gen = torch.Generator().manual_seed(0)
    decode = make_attention_problem([1] * 4, [30, 200, 1, 64], num_q_heads=8, num_kv_heads=2, head_dim=128,
                                    block_size=16, dtype=torch.bfloat16, device="cuda", generator=gen)  # fmt: skip
    prefill = make_attention_problem([30, 1, 64], [30, 200, 100], num_q_heads=8, num_kv_heads=2, head_dim=128,
                                     block_size=16, dtype=torch.bfloat16, device="cuda", generator=gen)  # fmt: skip
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    fused = torch.randn(8, 12, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = fused[:, :8], fused[:, 8:10], fused[:, 10:]
    positions = torch.arange(8, device="cuda")
    cos_sin = torch.rand(64, 128, device="cuda")
    kv = torch.randn(2, 4, 16, 2, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.arange(8, device="cuda")
    # compile first: Triton's first launch of a specialization may touch the device outside the kernel
    calls = [
        lambda: paged_attention(*decode.args(), max_query_len=1),
        lambda: paged_attention(*prefill.args(), max_query_len=64),
        lambda: rms_norm(x, w, 1e-6),
        lambda: rms_norm(x.clone(), w, 1e-6, x.clone()),
        lambda: silu_and_mul(x),
        lambda: rotary_embedding(positions, q, k, cos_sin),
        lambda: write_kv_cache(k, v, kv[0], kv[1], slots),
        lambda: attention_prep(positions, q, k, v, cos_sin, kv[0], kv[1], slots),
        lambda: attention_prep(positions, q, k, v, cos_sin, kv[0], kv[1], slots, w[:128], w[128:]),
    ]
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError):  # the check itself works: the reference reads lengths on the host
        torch.cuda.set_sync_debug_mode("error")
        try:
            paged_attention(*decode.args(), backend="torch")
        finally:
            torch.cuda.set_sync_debug_mode("default")
