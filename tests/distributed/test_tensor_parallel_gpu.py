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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("case", ["awq", "gptq-act", "fp8-online"])
def test_quantized_tp2_on_gpus_with_cuda_graphs_stays_near_one_gpu(tmp_path, case):
    """Quantized layers split over two GPUs (each rank's int4 / fp8 kernels on its slice, act-order's row-parallel
    layers regrouped, NCCL all-reduces inside the decode graphs) in bf16: the first-step logprobs of one GPU's run
    within the kernels' rounding (int4) or fp8's activation-quantization error (per-token scales over each rank's
    slice)."""
    from tests.core import test_quantized_checkpoints as qc

    if case == "fp8-online":
        config, state = qc.base_checkpoint()
        path, kwargs, atol = qc.save(tmp_path / "plain", config, state), {"quantization": "fp8"}, qc.FP8_FIRST_STEP_ATOL
    else:
        path = (qc.write_awq(tmp_path, 32) if case == "awq" else qc.write_gptq(tmp_path, 64, True, False))[0]
        kwargs, atol = {}, 0.05
    runs = []
    for tp in (1, 2):
        engine = make_engine(path, dtype="bfloat16", device="cuda", tensor_parallel_size=tp, **kwargs)
        try:
            assert engine.runner.graphs is not None
            results = run_engine(engine, qc.PROMPTS, qc.GREEDY)
        finally:
            engine.shutdown()
        runs.append([results[(i, 0)] for i in range(len(qc.PROMPTS))])
    assert qc.logprob_error(runs[1], runs[0], steps=1) <= atol
