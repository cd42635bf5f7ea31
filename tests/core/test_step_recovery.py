"""A step that raises fails the request it is blamed on, never the engine (issue 17); and what must still kill it."""

from __future__ import annotations

import pytest

from core.step_recovery import (
    MAX_CONSECUTIVE_FAILURES,
    FaultInjector,
    InjectedStepFault,
    StepFailedFatally,
    StepFailureTracker,
)
from ipc.messages import EngineRequest, FinishReason, SamplingParams
from tests.core.engine_utils import make_engine
from tests.tiny_models import make_tiny_model

MARKER = [97, 98, 99]
PROMPTS = {"a": [5, 9, 23, 11], "bad": [4, 6, *MARKER, 8], "b": list(range(40, 60)), "c": [7] * 33}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("recovery"), "llama", 0)


def greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def drive(engine, requests: dict[str, list[int]], params: SamplingParams | None = None, max_steps: int = 500):
    """Run to completion: ({request id: tokens}, {request id: finish reason}, [RequestError])."""
    for request_id, prompt in requests.items():
        engine.add_request(EngineRequest(request_id, prompt, params or greedy()))
    tokens: dict[str, list[int]] = {r: [] for r in requests}
    finished: dict[str, FinishReason] = {}
    errors = []
    for _ in range(max_steps):
        if not engine.has_work():
            break
        out = engine.step()
        errors.extend(out.errors)
        for o in out.outputs:
            tokens[o.request_id].extend(o.new_token_ids)
            if o.finish_reason is not None:
                finished[o.request_id] = o.finish_reason
    assert not engine.has_work()
    return tokens, finished, errors


def assert_no_leak(engine) -> None:
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1
    assert not engine._children and not engine.scheduler.running and not engine.scheduler.waiting


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_step_fault_fails_only_its_request_and_the_others_are_unchanged(model, async_scheduling):
    engine = make_engine(model, async_scheduling=async_scheduling)
    good = {k: v for k, v in PROMPTS.items() if k != "bad"}
    expected, _, _ = drive(engine, good)
    engine._faults = FaultInjector(MARKER)
    tokens, finished, errors = drive(engine, PROMPTS)
    assert [(e.request_id, e.internal) for e in errors] == [("bad", True)]
    assert "injected step fault" in errors[0].message
    assert "bad" not in finished
    assert {k: tokens[k] for k in good} == expected  # recomputed after the failed step: nothing lost or changed
    assert all(finished[k] is FinishReason.LENGTH for k in good)
    assert_no_leak(engine)
    # The engine keeps serving, the failed id is free again, and the episode left nothing behind.
    engine._faults = FaultInjector([])
    again, finished, errors = drive(engine, {"bad": PROMPTS["bad"], "a": PROMPTS["a"]})
    assert not errors and finished == {"bad": FinishReason.LENGTH, "a": FinishReason.LENGTH}
    assert again["a"] == expected["a"]
    assert not engine._failures.suspects and not engine._failures.cleared
    assert_no_leak(engine)


def test_a_lone_failing_request_is_failed_without_isolation(model):
    engine = make_engine(model)
    engine._faults = FaultInjector(MARKER)
    _, finished, errors = drive(engine, {"bad": PROMPTS["bad"]})
    assert [e.request_id for e in errors] == ["bad"] and not finished
    assert engine._failures.consecutive_failures == 1 and not engine._failures.suspects
    assert_no_leak(engine)


def test_a_step_that_fails_for_everyone_ends_the_engine(model, monkeypatch):
    engine = make_engine(model)

    def broken_launch(*args, **kwargs):
        raise RuntimeError("the runner is broken")

    monkeypatch.setattr(engine.runner, "launch", broken_launch)
    requests = {f"r{i}": [5 + i, 9, 23] for i in range(MAX_CONSECUTIVE_FAILURES)}
    for request_id, prompt in requests.items():
        engine.add_request(EngineRequest(request_id, prompt, greedy()))
    failed = []
    with pytest.raises(StepFailedFatally, match="failed steps in a row"):
        for _ in range(20):
            failed.extend(e.request_id for e in engine.step().errors)
    # batch failure, then each probe alone: the streak of failed steps ends the engine rather than every request
    assert len(failed) == MAX_CONSECUTIVE_FAILURES - 2


def test_device_errors_and_repeated_out_of_memory_end_the_engine(model, monkeypatch):
    engine = make_engine(model)

    def cuda_error(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.runner, "launch", cuda_error)
    engine.add_request(EngineRequest("x", [5, 6, 7], greedy()))
    with pytest.raises(StepFailedFatally, match="device error"):
        engine.step()

    engine = make_engine(model)

    class OutOfMemoryError(RuntimeError):
        pass

    def oom(*args, **kwargs):
        raise OutOfMemoryError("out of memory")

    monkeypatch.setattr(engine.runner, "launch", oom)
    for request_id in ("x", "y"):
        engine.add_request(EngineRequest(request_id, [5, 6, 7], greedy()))
    assert not engine.step().errors  # the first: isolate
    with pytest.raises(StepFailedFatally, match="out of memory twice"):
        engine.step()


def test_a_failure_while_processing_outputs_keeps_what_was_emitted(model, monkeypatch):
    """An exception part way through a step's output processing: the outputs made before it are still sent, and
    after isolation the culprit alone fails."""
    engine = make_engine(model)
    expected, _, _ = drive(engine, {"a": PROMPTS["a"], "b": PROMPTS["b"]})
    original = engine._append_tokens

    def append_tokens(seq, tokens):
        if seq.request_id == "b" and seq.num_output_tokens == 3:
            raise IndexError("output processing failed")
        return original(seq, tokens)

    monkeypatch.setattr(engine, "_append_tokens", append_tokens)
    tokens, finished, errors = drive(engine, {"a": PROMPTS["a"], "b": PROMPTS["b"]})
    assert [e.request_id for e in errors] == ["b"] and "IndexError" in errors[0].message
    assert tokens["a"] == expected["a"] and finished["a"] is FinishReason.LENGTH
    assert tokens["b"] == expected["b"][:3]  # what it emitted before its failure, each token once
    assert_no_leak(engine)


def test_tracker_attribution_rules():
    tracker = StepFailureTracker()
    assert tracker.attribute(ValueError("x"), ["a", "b", "c"]) is None  # several: isolate them
    assert tracker.suspects == ["a", "b", "c"] and tracker.holds("b") and not tracker.holds("a")
    assert tracker.holds("new")  # a request arriving meanwhile waits for the episode to end
    tracker.on_success({"a"}, {"a", "b", "c"})
    assert tracker.probe == "b" and tracker.cleared == {"a"} and not tracker.holds("a")
    assert tracker.attribute(ValueError("x"), ["a", "b"]) == "b"  # the cleared one is not blamed
    assert tracker.probe == "c"
    tracker.on_success({"a", "c"}, {"a", "c"})
    assert not tracker.isolating and not tracker.cleared and not tracker.holds("new")
    with pytest.raises(StepFailedFatally, match="without a request"):
        tracker.attribute(ValueError("x"), [])


def test_fault_injector_matches_a_token_run():
    injector = FaultInjector([3, 4])
    injector.check([("a", [1, 3, 5, 4]), ("b", [3])])
    with pytest.raises(InjectedStepFault, match="request b"):
        injector.check([("a", [1, 2]), ("b", [9, 3, 4])])
    assert not FaultInjector([]).enabled


def test_fault_tokens_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_TEST_STEP_FAULT_TOKENS", "12, 34")
    assert FaultInjector().marker == [12, 34]
    monkeypatch.delenv("PAGEDSERVE_TEST_STEP_FAULT_TOKENS")
    assert not FaultInjector().enabled


def test_a_transient_step_fault_fails_no_request(model):
    """A fault that does not repeat when its suspects run alone blames nobody: every request completes as if it
    had not happened."""
    engine = make_engine(model)
    expected, _, _ = drive(engine, PROMPTS)

    class Once:
        enabled = True
        fired = False

        def check(self, prompts):
            if not self.fired and any(len(p) and engine._children[r][0].num_output_tokens == 2 for r, p in prompts):
                self.fired = True
                raise RuntimeError("transient")

    engine._faults = Once()
    tokens, finished, errors = drive(engine, PROMPTS)
    assert engine._faults.fired and not errors
    assert tokens == expected and set(finished) == set(PROMPTS)
    assert_no_leak(engine)


def test_offline_llm_raises_for_a_prompt_failed_in_a_step(model):
    """The offline LLM says which prompt failed (it would otherwise return fewer outputs than prompts), and the
    engine stays usable."""
    from frontend.llm import LLM

    llm = LLM(str(model), skip_tokenizer_init=True, num_gpu_blocks_override=256, max_model_len=512)
    llm.engine._faults = FaultInjector(MARKER)
    prompts = [{"prompt_token_ids": PROMPTS["a"]}, {"prompt_token_ids": PROMPTS["bad"]}]
    with pytest.raises(RuntimeError, match="Prompt 1 failed: .*injected step fault"):
        llm.generate(prompts, greedy(), use_tqdm=False)
    outputs = llm.generate([{"prompt_token_ids": PROMPTS["a"]}], greedy(), use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 8
    assert_no_leak(llm.engine)


def test_a_failed_step_leaves_no_uncomputed_block_in_the_prefix_cache(model):
    """The failed step's full blocks were registered in the prefix cache when it was scheduled, but never computed:
    on a fresh engine (nothing cached from an earlier run), the recomputed requests must not hit them."""
    reference = make_engine(model)
    good = {k: v for k, v in PROMPTS.items() if k != "bad"}
    expected, _, _ = drive(reference, good)
    reference.shutdown()
    engine = make_engine(model)
    engine._faults = FaultInjector(MARKER)
    tokens, _, errors = drive(engine, PROMPTS)
    assert [e.request_id for e in errors] == ["bad"]
    assert {k: tokens[k] for k in good} == expected
    assert_no_leak(engine)
