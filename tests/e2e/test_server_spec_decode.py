"""`pagedserve serve --speculative-config` (n-gram) end to end: the same greedy text as without speculation,
streaming with several tokens per delta, a stop string inside an accepted run, vLLM's spec-decode metrics, and a
bad config refused at startup."""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest

from tests.frontend.model_files import tiny_llama_dir
from tests.frontend.server_process import REPO, ServerProcess

MODEL = "tiny-llama"
SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model = tiny_llama_dir(tmp_path_factory.mktemp("models") / "tiny-llama")
    common = ("--served-model-name", MODEL, "--max-model-len", "1024", "--num-gpu-blocks-override", "256")
    plain = ServerProcess(str(model), *common, wait=False)
    spec = ServerProcess(str(model), *common, "--speculative-config", SPEC, wait=False)
    plain.wait_ready()
    spec.wait_ready()
    yield plain, spec
    plain.stop()
    spec.stop()


def _client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_same_text_streaming_stop_and_metrics(servers):
    plain, spec = servers
    # The tiny model's own continuation, repeated in the prompt: n-gram drafts find it.
    seed_text = "one two three four five six seven"
    first = _client(plain).completions.create(model=MODEL, prompt=seed_text, max_tokens=40, temperature=0,
                                              extra_body={"ignore_eos": True})
    prompt = seed_text + first.choices[0].text + " " + seed_text
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
    want = _client(plain).completions.create(**kwargs).choices[0].text
    got = _client(spec).completions.create(**kwargs).choices[0].text
    assert got == want
    chunks = [c.choices[0].text for c in _client(spec).completions.create(**kwargs, stream=True)]
    assert "".join(chunks) == want
    # a stop string from the middle of the text: cut there, as without speculation
    stop = want[len(want) // 2 : len(want) // 2 + 3]
    if stop.strip():
        cut_plain = _client(plain).completions.create(**kwargs, stop=[stop]).choices[0]
        cut_spec = _client(spec).completions.create(**kwargs, stop=[stop]).choices[0]
        assert (cut_spec.text, cut_spec.finish_reason) == (cut_plain.text, cut_plain.finish_reason)
    drafts = spec.metric("vllm:spec_decode_num_draft_tokens_total", model_name=MODEL)
    accepted = spec.metric("vllm:spec_decode_num_accepted_tokens_total", model_name=MODEL)
    assert spec.metric("vllm:spec_decode_num_drafts_total", model_name=MODEL) > 0
    assert 0 <= accepted <= drafts  # acceptance itself is shown in tests/core/test_spec_decode.py
    per_pos = [spec.metric("vllm:spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(4)]
    assert sum(per_pos) == accepted and all(a >= b for a, b in zip(per_pos, per_pos[1:]))


def test_bad_speculative_config_fails_at_startup():
    proc = subprocess.run([sys.executable, "-m", "frontend.cli", "serve", "--speculative-config",
                           '{"method": "eagle9", "num_speculative_tokens": 2}'], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown method 'eagle9'" in proc.stderr
