"""The default SmolLM2 GGUF (210 Q4_1 tensors, a Q8_0 embedding tied to the LM head) with its weights kept in their
blocks (``--quantization gguf``): it answers "Paris", holds ~97 MB of weights instead of the dequantized model's
269 MB in bf16, and its greedy tokens match the dequantized-at-load path on a fixed prompt set. On CPU both paths
multiply in fp32 with the same weight values, so every sequence is identical; on the GPU the Triton block GEMM and
cuBLAS round differently, so near-ties may flip (the agreement is printed)."""

from __future__ import annotations

import pytest
import torch

from core.layers.quantization import weight_bytes
from frontend import LLM, SamplingParams

pytestmark = pytest.mark.slow  # CPU: the torch reference dequantizes every weight per step (no CPU kernel)

PROMPTS = ["The three primary colors are", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The largest planet in the solar system is"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
# Two engines live at once below (the module's and the dequantized reference): on a GPU each takes a small share, or
# the first one's KV cache leaves the second no memory.
MEMORY = {"gpu_memory_utilization": 0.2}


@pytest.fixture(scope="module")
def quantized():
    return LLM(max_model_len=512, quantization="gguf", **MEMORY)


def test_kept_quantized_answers_paris_in_100_mb(quantized):
    runner = quantized.engine.runner
    assert runner.model_config.quantization.name == "gguf"
    assert runner.model.model.embed_tokens.weight.dtype == torch.uint8
    assert 90e6 < weight_bytes(runner.model) < 105e6  # 269 MB dequantized to bf16
    out = quantized.chat([{"role": "user", "content": "What is the capital of France?"}],
                         SamplingParams(temperature=0.0, max_tokens=8))
    assert "Paris" in out[0].outputs[0].text


def test_greedy_tokens_match_dequantized_path(quantized):
    ours = [o.outputs[0].token_ids for o in quantized.generate(PROMPTS, GREEDY)]
    dequantized = LLM(max_model_len=512, gguf_dequantize=True, dtype=quantized.config.dtype, **MEMORY)
    assert dequantized.engine.runner.model_config.quantization is None
    reference = [o.outputs[0].token_ids for o in dequantized.generate(PROMPTS, GREEDY)]
    same = sum(a == b for a, b in zip(ours, reference))
    print(f"GGUF kept quantized vs dequantized: {same}/{len(PROMPTS)} prompts with identical greedy tokens")
    if quantized.engine.runner.device.type == "cpu":
        assert same == len(PROMPTS)
    else:
        assert same >= len(PROMPTS) - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gguf_quantized_on_cuda_with_cuda_graphs():
    llm = LLM(max_model_len=512, quantization="gguf", **MEMORY)
    runner = llm.engine.runner
    assert runner.model_config.quantization.name == "gguf" and runner.use_graphs
    assert weight_bytes(runner.model) < 105e6
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=16))
    assert "Paris" in out[0].outputs[0].text
