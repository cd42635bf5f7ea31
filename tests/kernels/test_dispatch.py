"""Dispatch: on CUDA every dispatcher takes its Triton kernel and none synchronizes with the host (CUDA-graph safe);
the backend a model is built with reaches every layer, and "torch" keeps every dispatcher on its reference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kernels.activation import silu_and_mul
from kernels.attention_prep import attention_prep
from kernels.backend import check_backend, resolve_backends, use_triton
from kernels.encoder_attention import encoder_attention
from kernels.paged_attention import paged_attention
from kernels.rmsnorm import rms_norm
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
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32, device="cuda")
    # compile first: Triton's first launch of a specialization may touch the device outside the kernel
    calls = [
        lambda: paged_attention(*decode.args(), max_query_len=1),
        lambda: paged_attention(*prefill.args(), max_query_len=64),
        lambda: rms_norm(x, w, 1e-6),
        lambda: rms_norm(x.clone(), w, 1e-6, x.clone()),
        lambda: silu_and_mul(x),
        lambda: attention_prep(positions, q, k, v, cos_sin, kv[0], kv[1], slots),
        lambda: attention_prep(positions, q, k, v, cos_sin, kv[0], kv[1], slots, w[:128], w[128:]),
        lambda: encoder_attention(q, k, v, cu_seqlens, 5, 0.1),
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


def test_backend_rule():
    """Triton only for CUDA tensors and never with "torch"; unknown names fail with the valid ones."""
    cuda_like, cpu = SimpleNamespace(is_cuda=True), torch.zeros(1)
    assert use_triton(cuda_like, "auto") and use_triton(cuda_like, "triton")
    assert not use_triton(cuda_like, "torch")
    assert not any(use_triton(cpu, backend) for backend in ("auto", "triton", "torch"))
    with pytest.raises(ValueError, match="auto, torch, triton"):
        check_backend("cuda")
    assert resolve_backends("auto", "torch") == ("torch", "torch")  # every kernel on its reference
    assert resolve_backends("torch", "auto") == ("torch", "auto")
    assert resolve_backends("triton", "triton") == ("triton", "triton")


@pytest.mark.parametrize("attention_backend, kernel_backend",
                         [("triton", "torch"), ("torch", "auto"), ("auto", "auto")])  # fmt: skip
def test_model_hands_its_backends_to_every_layer(attention_backend, kernel_backend):
    from core.config import ModelConfig
    from core.layers.attention import PagedAttention
    from core.layers.linear import Linear
    from core.layers.norm import RMSNorm
    from core.models.llama import MLP, LlamaForCausalLM
    from tests.tiny_models import hf_config

    hf = hf_config("qwen3").to_dict()  # q/k norms too
    hf["architectures"] = ["Qwen3ForCausalLM"]
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(hf), attention_backend=attention_backend,
                             kernel_backend=kernel_backend)  # fmt: skip
    want_attention, want_kernels = resolve_backends(attention_backend, kernel_backend)
    assert (model.attention_backend, model.kernel_backend) == (want_attention, want_kernels)
    seen = set()
    for module in model.modules():
        if isinstance(module, (Linear, RMSNorm)):
            assert module.backend == want_kernels, module
        elif isinstance(module, MLP):
            assert module.kernel_backend == want_kernels
        elif isinstance(module, PagedAttention):
            assert (module.attention_backend, module.kernel_backend) == (want_attention, want_kernels)
        seen.add(type(module))
    assert {Linear, RMSNorm, MLP, PagedAttention} <= seen
    with pytest.raises(ValueError, match="attention backend"):
        LlamaForCausalLM(ModelConfig.from_hf_dict(hf), attention_backend="flash")


@pytest.mark.gpu
def test_gpu_torch_backend_never_reaches_a_triton_launcher(monkeypatch):
    import kernels.activation
    import kernels.attention_prep
    import kernels.encoder_attention
    import kernels.paged_attention
    import kernels.rmsnorm
    import kernels.sampling
    import kernels.skinny_gemm
    from kernels.sampling import gumbel_argmax
    from kernels.skinny_gemm import linear

    def triton_called(*args, **kwargs):
        raise AssertionError("a Triton launcher ran under backend='torch'")

    for module, name in [(kernels.rmsnorm, "rms_norm_triton"), (kernels.activation, "silu_and_mul_triton"),
                         (kernels.attention_prep, "attention_prep_triton"), (kernels.sampling, "gumbel_argmax_triton"),
                         (kernels.skinny_gemm, "skinny_gemm"), (kernels.paged_attention, "paged_decode_attention"),
                         (kernels.paged_attention, "paged_prefill_attention"),
                         (kernels.encoder_attention, "encoder_attention_triton")]:  # fmt: skip
        monkeypatch.setattr(module, name, triton_called)
    gen = torch.Generator().manual_seed(1)
    decode = make_attention_problem([1] * 3, [30, 200, 1], num_q_heads=8, num_kv_heads=2, head_dim=128, block_size=16,
                                    dtype=torch.bfloat16, device="cuda", generator=gen)  # fmt: skip
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    fused = torch.randn(4, 12, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = fused[:, :8], fused[:, 8:10], fused[:, 10:]
    positions = torch.arange(4, device="cuda")
    cos_sin = torch.rand(64, 128, device="cuda")
    kv = torch.randn(2, 4, 16, 2, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.arange(4, device="cuda")
    logits = torch.randn(4, 1000, device="cuda")
    ones = torch.ones(4, device="cuda")
    ids = torch.arange(4, device="cuda")
    paged_attention(*decode.args(), max_query_len=1, backend="torch")
    paged_attention(*decode.args(), backend="torch")
    rms_norm(x, w, 1e-6, backend="torch")
    silu_and_mul(x, backend="torch")
    attention_prep(positions, q, k, v, cos_sin, kv[0], kv[1], slots, backend="torch")
    gumbel_argmax(logits, ones, ids, ids, backend="torch")
    linear(x[:1], x, backend="torch")
    encoder_attention(q, k, v, torch.tensor([0, 1, 4], dtype=torch.int32, device="cuda"), 3, 0.1, backend="torch")
    with pytest.raises(AssertionError, match="Triton launcher"):  # the check itself works
        rms_norm(x, w, 1e-6)
