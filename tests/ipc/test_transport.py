import os

import pytest
import zmq

from ipc.messages import (
    AbortRequests,
    EngineDead,
    EngineOutput,
    EngineOutputs,
    EngineRequest,
    FinishReason,
    Logprobs,
    ReadyMessage,
    RequestError,
    SamplingParams,
    SchedulerStats,
    Shutdown,
    UtilityOutput,
    UtilityRequest,
)
from ipc.transport import Encoder, IpcAddresses, input_decoder, make_socket, message_decoder

INPUTS = [
    EngineRequest("r1", [1, 2, 3], SamplingParams(n=2, temperature=0.7, stop=["x", "yz"], logit_bias={5: -3.0}),
                  cache_salt="tenant-a"),
    AbortRequests(["r1", "r2"]),
    AbortRequests(["r1"], indices=[1]),
    UtilityRequest(7, "reset_prefix_cache"),
    UtilityRequest(8, "get_stats", [1, "a"]),
    Shutdown(),
]

MESSAGES = [
    ReadyMessage("m", 2048, 100, 16, 49152, [2], "cpu"),
    EngineOutputs(
        outputs=[
            EngineOutput("r1", [5], index=1, new_logprobs=Logprobs([[5, 6]], [[-0.1, -0.2]], [1]),
                         finish_reason=FinishReason.STOP, stop_reason=5, num_cached_tokens=16),
            EngineOutput("r2", [7, 8]),
        ],
        scheduler_stats=SchedulerStats(num_running=2, kv_cache_usage=0.25, prefix_cache_hits=16),
        timestamp=3.5,
    ),
    EngineOutputs(utility_output=UtilityOutput(7, result={"num_running": 0})),
    EngineOutputs(errors=[RequestError("r3", "prompt too long", "prompt")]),
    EngineDead("boom"),
]


@pytest.mark.parametrize("message", INPUTS, ids=lambda m: type(m).__name__)
def test_engine_inputs_round_trip(message):
    assert input_decoder().decode(Encoder().encode(message)) == message


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_engine_messages_round_trip(message):
    decoded = message_decoder().decode(Encoder().encode(message))
    assert decoded == message and type(decoded) is type(message)


def test_finish_reason_decodes_as_enum():
    out = EngineOutputs(outputs=[EngineOutput("r", [1], finish_reason=FinishReason.LENGTH)])
    decoded = message_decoder().decode(Encoder().encode(out))
    assert decoded.outputs[0].finish_reason is FinishReason.LENGTH
    assert str(decoded.outputs[0].finish_reason) == "length"


def test_invalid_sampling_params_rejected_on_decode():
    bad = EngineRequest("r", [1], SamplingParams())
    bad.sampling_params.top_p = 5.0  # bypasses __post_init__; decoding must catch it
    with pytest.raises(ValueError):
        input_decoder().decode(Encoder().encode(bad))


def test_push_pull_over_ipc_and_cleanup():
    addrs = IpcAddresses.create()
    ctx = zmq.Context()
    try:
        pull = make_socket(ctx, addrs.output_addr, zmq.PULL, bind=True)
        push = make_socket(ctx, addrs.output_addr, zmq.PUSH, bind=False)
        push.send(Encoder().encode(MESSAGES[0]))
        assert pull.poll(5000)
        assert message_decoder().decode(pull.recv()) == MESSAGES[0]
        push.close()
        pull.close()
    finally:
        ctx.term()
        addrs.cleanup()
    assert not os.path.exists(addrs.directory)
