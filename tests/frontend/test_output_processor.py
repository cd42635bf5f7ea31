import asyncio
import math

import pytest
from transformers import AutoTokenizer

from frontend.metrics import Metrics
from frontend.output_processor import OutputProcessor
from ipc.messages import EngineOutput, FinishReason, Logprobs, SamplingParams

from tests.frontend.model_files import tokenizer_dir


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(tokenizer_dir(tmp_path_factory.mktemp("smollm2-tokenizer")))


def _feed(proc, request_id, ids, index=0, last_reason=None, stop_reason=None):
    """One EngineOutput per token, the last one carrying the finish reason; returns every ProcessedOutputs."""
    results = []
    for k, t in enumerate(ids):
        last = k == len(ids) - 1
        out = EngineOutput(request_id, [t], index=index,
                           finish_reason=last_reason if last else None,
                           stop_reason=stop_reason if last else None)
        results.append(proc.process_outputs([out]))
    return results


def test_cumulative_text_and_finish(tok):
    proc = OutputProcessor(tok)
    prompt_ids = tok.encode("Capital of France?")
    proc.add_request("r1", "Capital of France?", prompt_ids, SamplingParams(max_tokens=10))
    ids = tok.encode(" Paris is the capital. 😀")
    results = _feed(proc, "r1", ids, last_reason=FinishReason.LENGTH)
    final = results[-1].request_outputs[0]
    assert final.finished and final.request_id == "r1" and final.prompt == "Capital of France?"
    assert final.prompt_token_ids == prompt_ids
    assert final.outputs[0].text == " Paris is the capital. 😀"
    assert final.outputs[0].token_ids == ids
    assert final.outputs[0].finish_reason == "length"
    assert final.outputs[0].logprobs is None and final.outputs[0].cumulative_logprob is None
    assert not proc.has_unfinished_requests()
    # Every intermediate output is a prefix of the final text, never with a broken character.
    for r in results[:-1]:
        text = r.request_outputs[0].outputs[0].text
        assert "\ufffd" not in text and final.outputs[0].text.startswith(text)
        assert not r.request_outputs[0].finished


def test_deltas_concatenate_to_the_full_text(tok):
    proc = OutputProcessor(tok)
    proc.add_request("r", None, [1, 2, 3], SamplingParams(), stream_deltas=True)
    ids = tok.encode("Bonjour, ça va? 世界") + [tok.eos_token_id]
    results = _feed(proc, "r", ids, last_reason=FinishReason.STOP)
    deltas = [c for r in results for o in r.request_outputs for c in o.outputs]
    assert "".join(c.text for c in deltas) == "Bonjour, ça va? 世界"
    assert [t for c in deltas for t in c.token_ids] == ids
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason is None


def test_final_only_emits_once(tok):
    proc = OutputProcessor(tok)
    proc.add_request("r", "p", [5], SamplingParams(), final_only=True)
    results = _feed(proc, "r", tok.encode("a b c d"), last_reason=FinishReason.LENGTH)
    assert [len(r.request_outputs) for r in results] == [0, 0, 0, 1]
    assert results[-1].request_outputs[0].outputs[0].text == "a b c d"


def test_stop_string_finishes_and_asks_for_abort(tok):
    proc = OutputProcessor(tok)
    proc.add_request("r", None, [1], SamplingParams(n=2, stop=["capital"]), stream_deltas=True)
    ids = tok.encode("Paris is the capital of France")
    results = _feed(proc, "r", ids[:4], index=0)  # "Paris is the capital"
    hit = [r for r in results if r.to_abort]
    assert len(hit) == 1 and hit[0].to_abort == [("r", 0)]
    out0 = hit[0].request_outputs[0].outputs[0]
    assert out0.finish_reason == "stop" and out0.stop_reason == "capital"
    assert not hit[0].request_outputs[0].finished  # sequence 1 still running
    streamed = "".join(c.text for r in results for o in r.request_outputs for c in o.outputs)
    assert streamed == "Paris is the "
    # The core's late outputs for the stopped sequence (its ABORT) are ignored.
    late = proc.process_outputs([EngineOutput("r", [ids[4]], index=0, finish_reason=FinishReason.ABORT)])
    assert late.request_outputs == [] and late.to_abort == []
    final = _feed(proc, "r", tok.encode(" and more"), index=1, last_reason=FinishReason.LENGTH)[-1]
    assert final.request_outputs[0].finished and final.request_outputs[0].outputs[0].index == 1
    assert not proc.has_unfinished_requests()


def test_n_sequences_cumulative(tok):
    proc = OutputProcessor(tok)
    proc.add_request("r", None, [1], SamplingParams(n=2))
    a, b = tok.encode(" yes"), tok.encode(" no")
    r = proc.process_outputs([EngineOutput("r", a, index=0), EngineOutput("r", b, index=1)])
    assert [c.text for c in r.request_outputs[0].outputs] == [" yes", " no"]
    r = proc.process_outputs([EngineOutput("r", [2], index=1, finish_reason=FinishReason.STOP, stop_reason=None)])
    assert not r.request_outputs[0].finished
    r = proc.process_outputs([EngineOutput("r", [9], index=0, finish_reason=FinishReason.STOP, stop_reason=9)])
    out = r.request_outputs[0]
    assert out.finished
    assert [(c.index, c.finish_reason, c.stop_reason) for c in out.outputs] == [(0, "stop", 9), (1, "stop", None)]
    assert out.outputs[1].text == " no"  # EOS text left out
    assert out.outputs[1].token_ids == b + [2]


def test_logprobs_and_prompt_logprobs(tok):
    proc = OutputProcessor(tok)
    prompt = [1, 100, 200]
    proc.add_request("r", None, prompt, SamplingParams(logprobs=2, prompt_logprobs=1))
    new_lp = Logprobs(token_ids=[[300, 301, 300]], logprobs=[[-0.5, -0.1, -0.5]], ranks=[2])
    prompt_lp = Logprobs(token_ids=[[100, 7], [200, 200]], logprobs=[[-3.0, -1.0], [-0.2, -0.2]], ranks=[4, 1])
    r = proc.process_outputs([EngineOutput("r", [300], new_logprobs=new_lp, prompt_logprobs=prompt_lp)])
    out = r.request_outputs[0]
    assert out.prompt_logprobs[0] is None
    assert out.prompt_logprobs[1][100].logprob == -3.0 and out.prompt_logprobs[1][100].rank == 4
    assert out.prompt_logprobs[1][7].rank == 1
    assert list(out.prompt_logprobs[2]) == [200]
    lp = out.outputs[0].logprobs[0]
    assert list(lp) == [300, 301]  # chosen first, the duplicate top-N entry dropped
    assert lp[300].rank == 2 and lp[301].rank == 1
    assert lp[300].decoded_token == tok.decode([300])
    new_lp2 = Logprobs(token_ids=[[5, 5, 6]], logprobs=[[-0.25, -0.25, -2.0]], ranks=[1])
    r = proc.process_outputs([EngineOutput("r", [5], new_logprobs=new_lp2, finish_reason=FinishReason.LENGTH)])
    assert math.isclose(r.request_outputs[0].outputs[0].cumulative_logprob, -0.75)
    assert len(r.request_outputs[0].outputs[0].logprobs) == 2


def test_abort_request_drops_state(tok):
    proc = OutputProcessor(tok)
    proc.add_request("r", None, [1], SamplingParams())
    proc.abort_request("r")
    assert not proc.has_unfinished_requests()
    assert proc.process_outputs([EngineOutput("r", [5], finish_reason=FinishReason.ABORT)]).request_outputs == []


def test_duplicate_request_id_rejected(tok):
    proc = OutputProcessor(tok)
    proc.add_request("r", None, [1], SamplingParams())
    with pytest.raises(ValueError):
        proc.add_request("r", None, [1], SamplingParams())


def test_without_tokenizer_text_stays_empty():
    proc = OutputProcessor(None)
    proc.add_request("r", None, [1, 2], SamplingParams(stop=["x"]))
    r = proc.process_outputs([EngineOutput("r", [3, 4], finish_reason=FinishReason.LENGTH)])
    out = r.request_outputs[0]
    assert out.finished and out.outputs[0].text == "" and out.outputs[0].token_ids == [3, 4]


def _sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, {"model_name": "m", "engine": "0", **labels})


def test_queued_request_gets_its_outputs_on_its_queue_and_records_latencies(tok):
    proc = OutputProcessor(tok)
    metrics = Metrics("m", 1024)
    queue = asyncio.Queue()
    state = proc.add_request("q", None, [1, 2, 3], SamplingParams(), stream_deltas=True, queue=queue, arrival=10.0)
    proc.add_request("o", None, [1], SamplingParams(), arrival=10.0)  # no queue: its outputs come back in the result
    r = proc.process_outputs([EngineOutput("q", [5, 6]), EngineOutput("o", [7])], metrics, now=10.5)
    assert [o.request_id for o in r.request_outputs] == ["o"]
    assert queue.get_nowait().outputs[0].token_ids == [5, 6]
    r = proc.process_outputs([EngineOutput("q", [8], finish_reason=FinishReason.LENGTH)], metrics, now=11.25)
    assert r.request_outputs == []
    final = queue.get_nowait()
    assert final.finished and final.outputs[0].token_ids == [8] and queue.empty()
    assert state.num_generation_tokens == 3 and proc.has_unfinished_requests()  # "o" is still running
    assert _sample(metrics, "vllm:generation_tokens_total") == 4
    assert _sample(metrics, "vllm:time_to_first_token_seconds_count") == 2
    assert _sample(metrics, "vllm:time_to_first_token_seconds_sum") == 1.0
    assert _sample(metrics, "vllm:inter_token_latency_seconds_sum") == 0.75
    assert _sample(metrics, "vllm:request_success_total", finished_reason="length") == 1
    assert _sample(metrics, "vllm:e2e_request_latency_seconds_sum") == 1.25
    assert _sample(metrics, "vllm:request_generation_tokens_sum") == 3


def test_abort_returns_the_state_once_and_abort_all_empties_the_table(tok):
    proc = OutputProcessor(tok)
    a = proc.add_request("a", None, [1], SamplingParams(), queue=asyncio.Queue())
    b = proc.add_request("b", None, [1], SamplingParams(), queue=asyncio.Queue())
    assert proc.abort_request("a") is a and proc.abort_request("a") is None
    assert proc.abort_all() == [b] and not proc.has_unfinished_requests()
    assert b.queue.empty()


def test_embedding_requests_share_the_table():
    """An embedding request is one ``EmbeddingState`` in the same table: its one output puts the vector bytes on
    its queue and records it as finished; ids are unique across both kinds; abort and abort_all see it."""
    proc = OutputProcessor(None)
    metrics = Metrics("m", 1024)
    e = proc.add_embedding_request("e", 3, asyncio.Queue(), arrival=10.0)
    proc.add_request("g", None, [1], SamplingParams(), queue=asyncio.Queue())
    with pytest.raises(ValueError):
        proc.add_request("e", None, [1], SamplingParams())
    with pytest.raises(ValueError):
        proc.add_embedding_request("g", 1, asyncio.Queue())
    vector = b"\x00\x00\x80?" * 4
    r = proc.process_outputs([EngineOutput("e", [], finish_reason=FinishReason.STOP, embedding=vector)], metrics,
                             now=10.5)
    assert r.request_outputs == [] and e.queue.get_nowait() == vector
    assert _sample(metrics, "vllm:request_success_total", finished_reason="stop") == 1
    assert _sample(metrics, "vllm:request_prompt_tokens_sum") == 3
    assert _sample(metrics, "vllm:time_to_first_token_seconds_count") == 0  # no tokens: no token latencies
    e2 = proc.add_embedding_request("e2", 2, asyncio.Queue())
    assert proc.abort_request("e") is None and len(proc.abort_all()) == 2 and e2.queue.empty()
