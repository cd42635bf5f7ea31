"""kernels/pdl.py: the decode chain's kernels launched with programmatic dependent launch wait for the previous
kernel before touching its data, so a model gives the same tokens and logprobs with PDL on as off (inside CUDA
graphs, where the launches overlap)."""

from __future__ import annotations

import pytest
import torch

from kernels import pdl


def test_pdl_is_off_by_default_and_never_for_cpu_tensors(monkeypatch):
    assert pdl.ENABLED is False
    monkeypatch.setattr(pdl, "ENABLED", False)
    pdl.configure(True)
    assert pdl.ENABLED is True
    assert not pdl.use_pdl(torch.zeros(1))  # CPU (and the interpreter): never
    assert pdl.launch_options(False) == {"USE_PDL": False}  # the kernel's constexpr, no launch keyword
    assert pdl.launch_options(True) == {"USE_PDL": True, "launch_pdl": True}


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_pdl_chain_gives_the_same_tokens_and_logprobs_in_cuda_graphs(tmp_path, monkeypatch, quantization):
    from tests.core.test_quantized_checkpoints import base_checkpoint, greedy, logprob_error, save

    if not pdl.pdl_supported(0):
        pytest.skip("programmatic dependent launch needs Hopper (sm_90+) and Triton's griddepcontrol")
    config, state = base_checkpoint()
    path = save(tmp_path / "plain", config, state)
    monkeypatch.setattr(pdl, "ENABLED", False)  # restored after the test: the engines below configure it
    _, plain = greedy(path, dtype="bfloat16", device="cuda", quantization=quantization, enable_pdl=False)
    assert pdl.ENABLED is False
    _, chained = greedy(path, dtype="bfloat16", device="cuda", quantization=quantization, enable_pdl=True)
    assert pdl.ENABLED is True
    assert [r["tokens"] for r in chained] == [r["tokens"] for r in plain]
    assert logprob_error(chained, plain) == 0.0
