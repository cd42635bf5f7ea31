"""The embedding engine without a server: prefill-only scheduling, decoders as embedders (``task="embed"``, last-token
pooling) against transformers, task errors both ways, and a tiny Matryoshka BERT honouring ``dimensions``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.pooling_engine import PoolingEngineCore, create_engine_core
from ipc.config import EngineConfig
from ipc.messages import EngineRequest, SamplingParams
from tests.frontend.model_files import tiny_llama_dir

PARAMS = SamplingParams(max_tokens=1)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=40)
    cfg.architectures = ["BertModel"]
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["matryoshka_dimensions"] = [8, 16, 32]
    (path / "config.json").write_text(json.dumps(config))
    return path


def _run(engine, prompts: list[list[int]]) -> tuple[np.ndarray, int]:
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), p, PARAMS))
    vectors, steps = {}, 0
    while engine.has_work():
        steps += 1
        for out in engine.step().outputs:
            vectors[int(out.request_id)] = np.frombuffer(out.embedding, dtype=np.float32)
    return np.stack([vectors[i] for i in range(len(prompts))]), steps


def test_decoder_task_embed_pools_the_last_token(llama_dir):
    import transformers

    engine = create_engine_core(EngineConfig(model=str(llama_dir), task="embed", device="cpu"))
    assert isinstance(engine, PoolingEngineCore) and engine.ready_message().embedding.normalize
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 200, (n,), generator=gen).tolist() for n in (1, 5, 17, 40)]
    ours, _ = _run(engine, prompts)
    hf = transformers.AutoModel.from_pretrained(llama_dir, dtype=torch.float32).eval()
    for vector, prompt in zip(ours, prompts):
        with torch.no_grad():
            last = hf(torch.tensor([prompt])).last_hidden_state[0, -1]
        np.testing.assert_allclose(vector, (last / last.norm()).numpy(), atol=1e-4)


def test_generate_task_on_encoder_is_a_startup_error(bert_dir):
    with pytest.raises(ValueError, match="encoder"):
        create_engine_core(EngineConfig(model=str(bert_dir), task="generate", device="cpu"))
    with pytest.raises(ValueError, match="task must be"):
        create_engine_core(EngineConfig(model=str(bert_dir), task="classify", device="cpu"))
    with pytest.raises(ValueError, match="Embedding models run on one device"):
        create_engine_core(EngineConfig(model=str(bert_dir), device="cpu", tensor_parallel_size=2))


def test_prompts_are_scheduled_whole_within_the_budget(bert_dir):
    engine = create_engine_core(EngineConfig(model=str(bert_dir), device="cpu", max_num_batched_tokens=40,
                                             max_num_seqs=3))
    assert engine.max_model_len == 40
    prompts = [[5] * 30, [6] * 30, [7] * 3, [8] * 4, [9] * 2, [10] * 1]
    batched, steps = _run(engine, prompts)
    assert steps == 3  # [30] (the next 30 does not fit whole), [30, 3, 4] (max_num_seqs), [2, 1]
    singles = np.stack([_run(engine, [p])[0][0] for p in prompts])
    np.testing.assert_allclose(batched, singles, atol=1e-5)  # batching changes nothing
    assert engine.kv.num_free_blocks == 1 and not engine.scheduler.has_unfinished_sequences()  # nothing held


def test_engine_rejects_bad_prompts_and_aborts(bert_dir):
    engine = create_engine_core(EngineConfig(model=str(bert_dir), device="cpu"))
    with pytest.raises(ValueError, match="maximum of 40"):
        engine.add_request(EngineRequest("a", [1] * 41, PARAMS))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(EngineRequest("b", [], PARAMS))
    with pytest.raises(ValueError, match="Token ids"):
        engine.add_request(EngineRequest("c", [64], PARAMS))
    engine.add_request(EngineRequest("d", [1, 2], PARAMS))
    engine.abort_requests(["d"])
    outs = engine.step().outputs
    assert [(o.request_id, str(o.finish_reason), o.embedding) for o in outs] == [("d", "abort", None)]
    assert not engine.has_work()


def test_matryoshka_dimensions_are_honoured_offline(bert_dir):
    from frontend.llm import LLM

    llm = LLM(str(bert_dir), device="cpu", skip_tokenizer_init=True)
    full = np.array(llm.embed({"prompt_token_ids": [2, 3, 4]}, use_tqdm=False)[0].outputs.embedding)
    cut = np.array(llm.embed({"prompt_token_ids": [2, 3, 4]}, dimensions=16, use_tqdm=False)[0].outputs.embedding)
    assert full.shape == (32,) and cut.shape == (16,)
    np.testing.assert_allclose(cut, full[:16], atol=1e-6)  # plain BERT: CLS pooling, not normalised
    with pytest.raises(ValueError, match=r"\[8, 16, 32\]"):
        llm.embed({"prompt_token_ids": [2, 3]}, dimensions=12, use_tqdm=False)
