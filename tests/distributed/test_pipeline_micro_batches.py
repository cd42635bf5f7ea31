"""Pipeline parallelism with micro-batches in flight (CPU, gloo, one worker process for stage 1): with pp=2 the engine
keeps two steps in flight that never share a request, and the greedy tokens (and logprobs) equal one device's in fp32
for Llama and Qwen3, with chunked prefill, prefix-cache hits, preemption under a tiny KV budget and aborts of requests
whose step is in flight."""

from __future__ import annotations

import pytest

from ipc.messages import EngineRequest, FinishReason, SamplingParams
from tests.core.engine_utils import make_engine, record_output, run_engine
from tests.distributed.test_tensor_parallel import save_model

# Shared prefixes (prefix-cache hits), a prompt longer than the token budget (chunked prefill), short ones.
PROMPTS = [[5, 6, 7, 8] * 4, [5, 6, 7, 8] * 4 + [9, 10], list(range(20, 61)), [7, 8] * 5, [100, 3, 250, 8],
           [11, 12, 13], [5, 6, 7, 8] * 2 + [1], list(range(60, 80)), [42] * 6, [9, 1, 9, 1, 9]]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pp-models")


def run_recording_batches(engine, prompts, params, abort_after: int | None = None, num_aborts: int = 0):
    """``run_engine`` that also records, after every step, the request ids of each micro-batch in flight. After
    ``abort_after`` steps, aborts ``num_aborts`` requests that have a step in flight. Returns (results, in-flight
    snapshots, aborted ids)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), prompt, params))
    results: dict[int, dict] = {}
    snapshots: list[list[set[str]]] = []
    aborted: list[str] = []
    steps = 0
    while engine.has_work():
        for out in engine.step().outputs:
            record_output(results, int(out.request_id), out)
        snapshots.append([{s.seq.request_id for s in sched.scheduled} for sched, _ in engine._batch_queue])
        steps += 1
        if steps == abort_after:
            in_flight = sorted({r for batch in snapshots[-1] for r in batch}, key=int)
            aborted = in_flight[-num_aborts:]
            assert len(aborted) == num_aborts, snapshots[-1]
            engine.abort_requests(aborted)
    return results, snapshots, aborted


def one_device_reference(path, params: SamplingParams, settings: dict) -> dict:
    engine = make_engine(path, **settings)
    try:
        return run_engine(engine, PROMPTS, params)
    finally:
        engine.shutdown()


def assert_two_disjoint_batches_in_flight(snapshots):
    assert max(len(batches) for batches in snapshots) == 2  # pipeline_parallel_size micro-batches, no more
    both = [batches for batches in snapshots if len(batches) == 2]
    assert both, "never two micro-batches in flight"
    for first, second in both:
        assert first and second and not first & second, (first, second)


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("qwen3", {"num_key_value_heads": 1, "vocab_size": 383}),
], ids=["llama", "qwen3-kv1-vocab383"])
def test_pp2_micro_batches_greedy_equal_one_device(models_dir, arch, overrides):
    path = save_model(models_dir, arch, **overrides)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    settings = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=32)
    reference = one_device_reference(path, params, settings)
    engine = make_engine(path, pipeline_parallel_size=2, **settings)
    try:
        assert engine.micro_batches == 2
        results, snapshots, _ = run_recording_batches(engine, PROMPTS, params)
        stats = engine.get_stats()
    finally:
        engine.shutdown()
    assert_two_disjoint_batches_in_flight(snapshots)
    assert stats["prefix_cache_hits"] > 0, stats
    for i in range(len(PROMPTS)):
        want, got = reference[(i, 0)], results[i]
        assert got["tokens"] == want["tokens"], i
        for w, g in zip(want["logprobs"], got["logprobs"]):
            assert w.keys() == g.keys() and all(abs(w[t] - g[t]) < 1e-4 for t in w)


def test_pp2_micro_batches_with_preemption_and_aborts_in_flight(models_dir):
    """A KV budget of 17 blocks of 4 tokens for 10 requests: preemptions, some of sequences in flight. Two requests
    are aborted while their step is in flight; every other request's tokens equal one device's, and the engine
    serves a new request afterwards."""
    path = save_model(models_dir, "llama")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    settings = dict(dtype="float32", max_num_seqs=6, num_gpu_blocks_override=17, block_size=4,
                    max_num_batched_tokens=16, max_model_len=64)
    reference = one_device_reference(path, params, settings)
    engine = make_engine(path, pipeline_parallel_size=2, **settings)
    try:
        results, snapshots, aborted = run_recording_batches(engine, PROMPTS, params, abort_after=6, num_aborts=2)
        stats = engine.get_stats()
        again = run_engine(engine, [PROMPTS[2]], params)
    finally:
        engine.shutdown()
    assert_two_disjoint_batches_in_flight(snapshots)
    assert stats["total_preemptions"] > 0 and stats["prefix_cache_hits"] > 0, stats
    for i in range(len(PROMPTS)):
        if str(i) in aborted:
            assert results[i]["finish_reason"] == FinishReason.ABORT
            assert results[i]["tokens"] == reference[(i, 0)]["tokens"][: len(results[i]["tokens"])]
        else:
            assert results[i]["tokens"] == reference[(i, 0)]["tokens"], i
    assert again[(0, 0)]["tokens"] == reference[(2, 0)]["tokens"]


def test_pp2_step_fault_fails_only_its_request_with_micro_batches_in_flight(models_dir):
    """A step that raises while another micro-batch is in flight: that one is finished on every rank and dropped
    (the ranks stay paired), the culprit fails alone, every other request's tokens equal one device's."""
    from core.step_recovery import FaultInjector
    from tests.core.test_step_recovery import MARKER, PROMPTS as FAULT_PROMPTS, assert_no_leak, drive

    path = save_model(models_dir, "llama")
    prompts = {k: FAULT_PROMPTS[k] for k in ("a", "b", "bad", "c")}  # "bad" in the second micro-batch
    good = {k: v for k, v in prompts.items() if k != "bad"}
    engine = make_engine(path, dtype="float32", max_num_seqs=4)
    try:
        expected, _, _ = drive(engine, good)
    finally:
        engine.shutdown()
    engine = make_engine(path, dtype="float32", max_num_seqs=4, pipeline_parallel_size=2)
    try:
        in_flight_at_fault = []

        class RecordingInjector(FaultInjector):
            def check(self, scheduled):
                scheduled = list(scheduled)
                if any(p == prompts["bad"] for _, p in scheduled):
                    in_flight_at_fault.append(len(engine._batch_queue))
                super().check(scheduled)

        engine._faults = RecordingInjector(MARKER)
        tokens, finished, errors = drive(engine, prompts)
        assert in_flight_at_fault[0] == 1  # the first micro-batch was in flight when the second one failed
        assert [(e.request_id, e.internal) for e in errors] == [("bad", True)]
        assert {k: tokens[k] for k in good} == expected and "bad" not in finished
        assert_no_leak(engine)
        engine._faults = FaultInjector([])
        again, _, errors = drive(engine, {"a": prompts["a"]})
        assert not errors and again["a"] == expected["a"]
    finally:
        engine.shutdown()
