"""Tensor parallelism on two GPUs (NCCL), dense and MoE: the decode CUDA graphs are captured with the all-reduces and
the logits gather inside, and greedy tokens match one GPU's (fp32). Skipped without two GPUs."""

from __future__ import annotations

import pytest
import torch

from ipc.messages import SamplingParams
from tests.core.engine_utils import make_engine, run_engine
from tests.distributed.test_tensor_parallel import PROMPTS, save_model

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("pp", [1, 2], ids=["tp2", "pp2"])
def test_tp2_on_gpus_with_cuda_graphs_equals_one_gpu(tmp_path, pp):
    path = save_model(tmp_path, "qwen3", num_key_value_heads=1, vocab_size=383)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    results = []
    for kwargs in ({}, {"tensor_parallel_size": 2} if pp == 1 else {"pipeline_parallel_size": 2}):
        engine = make_engine(path, dtype="float32", device="cuda", max_num_seqs=8, **kwargs)
        try:
            if "tensor_parallel_size" in kwargs:
                assert engine.runner.graphs is not None  # decode steps replay graphs holding NCCL collectives
            out = run_engine(engine, PROMPTS, params)
        finally:
            engine.shutdown()
        results.append({k: v["tokens"] for k, v in out.items()})
    assert results[1] == results[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_tp2_on_gpus_with_cuda_graphs_equals_one_gpu(tmp_path, arch):
    """The experts' intermediate dimension split over two GPUs (Triton fused MoE, one NCCL all-reduce per MoE block
    inside the decode graphs): one GPU's greedy tokens (fp32: the kernels' dots run in IEEE fp32)."""
    path = save_model(tmp_path, arch)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    results = []
    for tp in (1, 2):
        engine = make_engine(path, dtype="float32", device="cuda", max_num_seqs=8, tensor_parallel_size=tp)
        try:
            assert engine.runner.graphs is not None
            out = run_engine(engine, PROMPTS, params)
        finally:
            engine.shutdown()
        results.append({k: v["tokens"] for k, v in out.items()})
    assert results[1] == results[0]
