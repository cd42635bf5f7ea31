"""The core's output routing for --api-server-count: each request's outputs to its sender, one message per client."""

from __future__ import annotations

from ipc.messages import (
    EngineOutput,
    EngineOutputs,
    EngineRequest,
    FinishReason,
    ReadyMessage,
    RequestError,
    SamplingParams,
    SchedulerStats,
    UtilityOutput,
)
from ipc.routing import OutputRouter


def test_outputs_go_to_their_sender_and_owners_are_forgotten_when_done():
    router = OutputRouter(3)
    router.add_request(EngineRequest("a", [1], SamplingParams(), client_index=0))
    router.add_request(EngineRequest("b", [1], SamplingParams(n=2), client_index=2))
    stats = SchedulerStats(num_running=2)
    routed = dict(router.route(EngineOutputs(outputs=[
        EngineOutput("a", [5]), EngineOutput("b", [6], index=0), EngineOutput("b", [7], index=1,
                                                                              finish_reason=FinishReason.LENGTH),
        EngineOutput("gone", [8])], scheduler_stats=stats, timestamp=1.0)))
    assert sorted(routed) == [0, 1, 2]  # stats reach every process, one message each
    assert [o.request_id for o in routed[0].outputs] == ["a"]
    assert [(o.request_id, o.index) for o in routed[2].outputs] == [("b", 0), ("b", 1)]
    assert routed[1].outputs == [] and all(m.scheduler_stats is stats for m in routed.values())
    assert router.owner("b") == 2 and len(router) == 2  # one of b's two sequences is still running
    routed = dict(router.route(EngineOutputs(outputs=[
        EngineOutput("b", [], index=0, finish_reason=FinishReason.ABORT)])))
    assert list(routed) == [2] and len(router) == 1


def test_errors_utility_replies_and_broadcasts():
    router = OutputRouter(2)
    router.add_request(EngineRequest("x", [1], SamplingParams(), client_index=1))
    routed = dict(router.route(EngineOutputs(errors=[RequestError("x", "bad"), RequestError("unknown", "undecodable")],
                                             utility_output=UtilityOutput(3, result=True, client_index=1))))
    assert [e.request_id for e in routed[1].errors] == ["x", "unknown"]
    assert [e.request_id for e in routed[0].errors] == ["unknown"]
    assert routed[1].utility_output.call_id == 3 and routed[0].utility_output is None
    assert len(router) == 0
    ready = ReadyMessage("m", 16, 4, 16, 100, [1], "cpu")
    assert router.route(ready) == [(0, ready), (1, ready)]
    assert OutputRouter(1).route(ready) == [(0, ready)]
