"""The real all-MiniLM-L6-v2 (from its PyPI package) through ``LLM.embed`` and through ``/v1/embeddings`` with the
official ``openai`` client, against sentence-transformers' own embeddings; bad inputs get OpenAI-shaped 400s."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from tests.frontend.server_process import ServerProcess

MODEL = "all-MiniLM-L6-v2"

WORDS = ("retrieval augmented generation serves answers grounded in documents that a vector index returns for "
         "the query embedding while the paged cache keeps the decoder busy with many concurrent streams").split()
# 32 sentences of mixed lengths: one word up to ~200 tokens (all under sentence-transformers' 256-token limit)
SENTENCES = ["Paris is the capital of France.", "hello", "What is the capital of France?",
             "The quick brown fox jumps over the lazy dog."] + [
    " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + (i * 37) % 180)) + "." for i in range(28)]


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    from core.model_source import resolve_model

    st = SentenceTransformer(resolve_model(MODEL).path, device="cpu")
    return st.encode(SENTENCES, batch_size=32, convert_to_numpy=True)


def _cosines(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)


@pytest.fixture(scope="module")
def llm():
    from frontend.llm import LLM

    return LLM(MODEL)


def test_offline_embed_matches_sentence_transformers(llm, reference):
    outs = llm.embed(SENTENCES, use_tqdm=False)
    ours = np.array([o.outputs.embedding for o in outs])
    assert ours.shape == (32, 384)
    assert _cosines(ours, reference).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # the Normalize module


def test_offline_embed_errors(llm):
    with pytest.raises(ValueError, match="embedding model"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="more than the model's maximum of 512"):
        llm.embed("word " * 600, use_tqdm=False)
    truncated = llm.embed("word " * 600, truncate_prompt_tokens=512, use_tqdm=False)[0]
    assert len(truncated.prompt_token_ids) == 512 and len(truncated.outputs.embedding) == 384
    with pytest.raises(ValueError, match="matryoshka"):
        llm.embed("hello", dimensions=64, use_tqdm=False)


# ---------------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(MODEL, "--max-num-seqs", "64")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_server_embeddings_match_sentence_transformers(client, reference):
    response = client.embeddings.create(model=MODEL, input=SENTENCES)
    ours = np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)])
    assert _cosines(ours, reference).min() >= 0.9999
    assert response.usage.prompt_tokens > 32 * 3


def test_base64_equals_float(server, client):
    as_float = client.embeddings.create(model=MODEL, input=SENTENCES[:3], encoding_format="float")
    raw = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": SENTENCES[:3],
                                                          "encoding_format": "base64"}, timeout=60).json()
    # Two requests, computed twice: the engine may batch the three inputs differently each time (they arrive as
    # separate sequences), and a different batch shape changes float32 sums in the last bit (a CI run saw 1e-7). A
    # wrong encoding (dtype, byte order, length) would be far off, so the values are compared to float32 rounding.
    for f, b in zip(as_float.data, raw["data"]):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype=np.float32)
        assert decoded.shape == (len(f.embedding),)
        np.testing.assert_allclose(decoded, np.array(f.embedding, dtype=np.float32), rtol=1e-5, atol=1e-6)


def test_token_id_inputs_equal_text(server, client):
    from transformers import AutoTokenizer

    from core.model_source import resolve_model

    ids = AutoTokenizer.from_pretrained(resolve_model(MODEL).path)(SENTENCES[:2])["input_ids"]
    by_text = client.embeddings.create(model=MODEL, input=SENTENCES[:2])
    by_ids = client.embeddings.create(model=MODEL, input=ids)
    single = client.embeddings.create(model=MODEL, input=ids[0])
    np.testing.assert_allclose(by_ids.data[1].embedding, by_text.data[1].embedding, atol=1e-6)
    np.testing.assert_allclose(single.data[0].embedding, by_text.data[0].embedding, atol=1e-6)


def test_models_reports_task(server):
    card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
    assert card["task"] == "embed" and card["max_model_len"] == 512


@pytest.mark.parametrize("body,param,needle", [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty"),
    ({"input": ["ok", ""]}, "input", "empty"),
    ({"input": "word " * 600}, "input", "maximum of 512"),
    ({"input": 5}, "input", "input"),
    ({"input": ["a", 1]}, "input", "input"),
    ({"input": [[1, 2], [3, 99999]]}, "input", "out of vocabulary"),  # vLLM's wording (issue 20)
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
    ({"input": "hi", "dimensions": 64}, "dimensions", "matryoshka"),
    ({"input": "hi", "truncate_prompt_tokens": 1000}, "truncate_prompt_tokens", "truncate_prompt_tokens"),
])
def test_bad_inputs_are_400(server, body, param, needle):
    response = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and needle in error["message"] and error["type"] == "BadRequestError"


def test_truncation_only_when_asked(server):
    response = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": "word " * 600,
                                                                "truncate_prompt_tokens": -1}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 512


def test_generation_request_to_embedding_model_is_400(client):
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.completions.create(model=MODEL, prompt="hello", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_server_survives_bad_requests(client):
    """After every error above, good requests still work."""
    assert len(client.embeddings.create(model=MODEL, input="still alive").data[0].embedding) == 384
