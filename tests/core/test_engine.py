"""EngineCore end to end on a tiny model: stop conditions, n > 1, seeds, prompt logprobs, aborts, bad input."""

from __future__ import annotations

import pytest
import torch

from ipc.messages import EngineRequest, FinishReason, SamplingParams
from tests.core.engine_utils import make_engine, run_engine
from tests.tiny_models import make_tiny_model

EOS = 1  # tiny models' eos_token_id


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("engine"), "llama", 0)


@pytest.fixture(scope="module")
def engine(model):
    return make_engine(model)


PROMPTS = [[5, 9, 23, 11], list(range(40, 60)), [7] * 33]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **{"max_tokens": 10, "ignore_eos": True, **kw})


def test_max_tokens_ends_with_length(engine):
    out = run_engine(engine, PROMPTS[:1], greedy(max_tokens=7))[(0, 0)]
    assert len(out["tokens"]) == 7 and out["finish_reason"] is FinishReason.LENGTH


def test_stop_token_id_ends_with_stop_and_reports_it(engine):
    tokens = run_engine(engine, PROMPTS[:1], greedy())[(0, 0)]["tokens"]
    stop = tokens[3]
    first = tokens.index(stop)
    out = run_engine(engine, PROMPTS[:1], greedy(stop_token_ids=[stop]))[(0, 0)]
    assert out["tokens"] == tokens[: first + 1]
    assert out["finish_reason"] is FinishReason.STOP and out["stop_reason"] == stop


def test_eos_stops_unless_ignored(engine):
    forced = {EOS: 100.0}
    out = run_engine(engine, PROMPTS[:1], greedy(ignore_eos=False, logit_bias=forced))[(0, 0)]
    assert out["tokens"] == [EOS] and out["finish_reason"] is FinishReason.STOP and out["stop_reason"] is None
    out = run_engine(engine, PROMPTS[:1], greedy(ignore_eos=True, logit_bias=forced, max_tokens=4))[(0, 0)]
    assert out["tokens"] == [EOS] * 4 and out["finish_reason"] is FinishReason.LENGTH


def test_min_tokens_holds_back_eos(engine):
    out = run_engine(engine, PROMPTS[:1], greedy(ignore_eos=False, logit_bias={EOS: 100.0}, min_tokens=3))[(0, 0)]
    assert len(out["tokens"]) == 4 and EOS not in out["tokens"][:3] and out["tokens"][3] == EOS


def test_max_model_len_ends_with_length(model):
    engine = make_engine(model, max_model_len=40)
    out = run_engine(engine, [PROMPTS[2]], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[(0, 0)]
    assert len(PROMPTS[2]) + len(out["tokens"]) == 40 and out["finish_reason"] is FinishReason.LENGTH


def test_seeded_sampling_is_reproducible_across_batch_compositions(model):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = run_engine(make_engine(model), [PROMPTS[1]], params)[(0, 0)]["tokens"]
    others = [SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=99, max_tokens=5, ignore_eos=True)]
    crowd = run_engine(make_engine(model), [PROMPTS[0], PROMPTS[1], PROMPTS[2]],
                       [others[0], params, others[1]])
    assert crowd[(1, 0)]["tokens"] == alone


def test_seeded_sampling_is_reproducible_through_preemption(model):
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    prompts = [[i + 3] * 14 for i in range(6)]
    calm = run_engine(make_engine(model), prompts, params)
    tight_engine = make_engine(model, num_gpu_blocks_override=8, max_model_len=64)
    tight = run_engine(tight_engine, prompts, params)
    assert tight_engine.scheduler.total_preemptions > 0
    assert {k: v["tokens"] for k, v in tight.items()} == {k: v["tokens"] for k, v in calm.items()}


def test_n_sequences_share_the_prompt_blocks(model):
    engine = make_engine(model, enable_prefix_caching=False)
    prompt = list(range(100, 140))  # 2 full blocks + 8 tokens
    engine.add_request(EngineRequest("r", prompt, SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=4,
                                                                 ignore_eos=True)))
    engine.step()
    seqs = engine._children["r"]
    tables = [engine.kv.block_ids(s) for s in seqs]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3
    assert engine.kv.pool.num_blocks - 1 - engine.kv.num_free_blocks == 2 + 3


def test_n_sequence_i_equals_a_single_request_with_seed_plus_i(model):
    prompt = list(range(100, 140))
    many = run_engine(make_engine(model), [prompt], SamplingParams(n=3, temperature=1.0, seed=10, max_tokens=6,
                                                                   ignore_eos=True))
    assert len(many) == 3
    for i in range(3):
        single = run_engine(make_engine(model), [prompt], SamplingParams(temperature=1.0, seed=10 + i, max_tokens=6,
                                                                         ignore_eos=True))
        assert many[(0, i)]["tokens"] == single[(0, 0)]["tokens"]


def test_prompt_logprobs_match_hf(model, engine):
    import transformers

    prompt = list(range(40, 60))
    out = run_engine(engine, [prompt], greedy(max_tokens=1, prompt_logprobs=2))[(0, 0)]
    rows = out["prompt_logprobs"]
    assert len(rows.token_ids) == len(prompt) - 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    for pos in range(len(prompt) - 1):
        target = prompt[pos + 1]
        assert rows.token_ids[pos][0] == target
        assert rows.logprobs[pos][0] == pytest.approx(lp[pos, target].item(), abs=1e-4)
        assert rows.token_ids[pos][1] == lp[pos].argmax().item()
        assert rows.ranks[pos] == int((lp[pos] > lp[pos, target]).sum()) + 1


@pytest.mark.parametrize("stress", [dict(max_num_batched_tokens=8),
                                    dict(num_gpu_blocks_override=8, max_model_len=64, max_num_batched_tokens=10)])
def test_prompt_logprobs_survive_chunking_and_preemption(model, stress):
    prompts = [[i + 3] * 10 + list(range(50, 54)) for i in range(6)]
    params = greedy(max_tokens=12, prompt_logprobs=1)
    calm = run_engine(make_engine(model), prompts, params)
    engine = make_engine(model, **stress)
    stressed = run_engine(engine, prompts, params)
    if "num_gpu_blocks_override" in stress:
        assert engine.scheduler.total_preemptions > 0
    for key in calm:
        a, b = calm[key]["prompt_logprobs"], stressed[key]["prompt_logprobs"]
        assert b.token_ids == a.token_ids and b.ranks == a.ranks
        assert torch.allclose(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5)


def test_abort_frees_blocks_and_reports_abort(engine):
    engine.add_request(EngineRequest("x", list(range(30)), greedy(max_tokens=50)))
    engine.step()
    assert engine.kv.num_free_blocks < engine.kv.pool.num_blocks - 1
    engine.abort_requests(["x"])
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1
    outs = engine.step().outputs
    assert [(o.request_id, o.finish_reason) for o in outs] == [("x", FinishReason.ABORT)]
    assert not engine.has_work()


def test_abort_one_sequence_of_n(engine):
    engine.add_request(EngineRequest("y", [3, 4, 5], SamplingParams(n=2, temperature=1.0, max_tokens=20,
                                                                    ignore_eos=True)))
    engine.step()
    engine.abort_requests(["y"], [1])
    finished = {}
    while engine.has_work():
        for o in engine.step().outputs:
            if o.finish_reason is not None:
                finished[o.index] = o.finish_reason
    assert finished == {1: FinishReason.ABORT, 0: FinishReason.LENGTH}


@pytest.mark.parametrize("prompt, message", [
    ([], "empty"),
    ([5] * 600, "max_model_len"),
    ([5, 100000], "token ids"),
])
def test_bad_prompts_are_refused(engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request(EngineRequest("bad", prompt, greedy()))
    assert not engine.has_work()


def test_async_scheduling_gives_the_same_tokens(model):
    """Seeded sampling, penalties (which make the engine wait for the step in flight) and stop conditions."""
    prompts = [[i + 3] * 14 for i in range(6)]
    params = [SamplingParams(temperature=1.0, seed=7 + i, max_tokens=12, ignore_eos=True) for i in range(4)] + [
        SamplingParams(temperature=0.7, seed=1, max_tokens=12, ignore_eos=True, repetition_penalty=1.3,
                       presence_penalty=0.5),
        greedy(max_tokens=9, min_tokens=2, stop_token_ids=[17]),
    ]
    sync = run_engine(make_engine(model, async_scheduling=False), prompts, params)
    engine = make_engine(model, async_scheduling=True, num_gpu_blocks_override=8, max_model_len=64)
    both = run_engine(engine, prompts, params)
    assert engine.scheduler.total_preemptions > 0
    assert {k: (v["tokens"], v["finish_reason"]) for k, v in both.items()} == \
        {k: (v["tokens"], v["finish_reason"]) for k, v in sync.items()}


def test_logprobs_minus_one_is_the_whole_vocabulary_and_requested_ids_come_in_order(engine):
    """logprobs=-1 (vLLM): every token's logprob at each position. logprob_token_ids in the same batch: the sampled
    token plus exactly the ids asked, with the same values as the full rows."""
    vocab = engine.ready_message().vocab_size
    prompt = list(range(10, 20))
    full, picked = run_engine(engine, [prompt, prompt],
                              [greedy(max_tokens=3, logprobs=-1, prompt_logprobs=-1),
                               greedy(max_tokens=3, logprobs=0, logprob_token_ids=[5, 1, 99])]).values()
    assert full["tokens"] == picked["tokens"]
    assert all(len(row) == vocab for row in full["logprobs"])
    assert len(full["prompt_logprobs"].token_ids[0]) == vocab + 1
    for token, whole, row in zip(picked["tokens"], full["logprobs"], picked["logprobs"]):
        assert set(row) == {token, 5, 1, 99}
        for tid, lp in row.items():
            assert lp == pytest.approx(whole[tid], abs=1e-5)
