"""Stream policy, without processes: each step's delta is its own output while the consumer keeps up; once
MERGE_BACKLOG or more are waiting (a slow client) they merge into one, and nothing is dropped. Plus SSEResponse:
frames, [DONE], the ping after silence, and a disconnect closing the stream (which aborts the request)."""

from __future__ import annotations

import asyncio

from frontend.engine_client import MERGE_BACKLOG, EngineClient
from frontend.stream_frames import DONE_FRAME, PING_FRAME, SSEResponse
from ipc.messages import EngineConfig, EngineOutput, FinishReason, ReadyMessage, SamplingParams


class _Sent:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, frame, copy=False, flags=0) -> None:
        self.frames.append(bytes(frame))


def _client() -> EngineClient:
    client = EngineClient(EngineConfig(model="none"), None, "m")
    client.ready = ReadyMessage("m", 64, 8, 16, 100, [1], "cpu")
    client._in_sock = _Sent()
    return client


def _consume_with_backlog(backlog: int, total: int) -> list[list[int]]:
    """Queue ``backlog`` steps before the consumer looks, then the rest one at a time; token ids per output."""

    async def run() -> list[list[int]]:
        client = _client()
        gen = client.generate("r", None, [5, 6], SamplingParams(max_tokens=total, ignore_eos=True))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)  # the request is sent, its state registered
        step = 0

        def push() -> None:
            nonlocal step
            finish = FinishReason.LENGTH if step == total - 1 else None
            client.processor.process_outputs([EngineOutput("r", [10 + step], finish_reason=finish)])
            step += 1

        for _ in range(backlog):
            push()
        outputs = [await first]
        while not outputs[-1].finished:
            if step < total:
                push()
            outputs.append(await gen.__anext__())
        return [out.outputs[0].token_ids for out in outputs]

    return asyncio.run(run())


def test_every_step_is_its_own_output_while_the_consumer_keeps_up():
    assert _consume_with_backlog(1, 20) == [[10 + i] for i in range(20)]
    assert _consume_with_backlog(MERGE_BACKLOG - 1, 20) == [[10 + i] for i in range(20)]


def test_a_backlog_merges_and_drops_nothing():
    outputs = _consume_with_backlog(MERGE_BACKLOG + 4, 20)
    assert outputs[0] == [10 + i for i in range(MERGE_BACKLOG + 4)]
    assert [t for ids in outputs for t in ids] == [10 + i for i in range(20)]
    assert len(outputs) == 20 - (MERGE_BACKLOG + 4) + 1


def _drive(response: SSEResponse, disconnect_after: float | None = None) -> list[bytes]:
    sent: list[bytes] = []

    async def run() -> None:
        async def receive():
            if disconnect_after is None:
                await asyncio.Event().wait()
            await asyncio.sleep(disconnect_after)
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body":
                sent.append(message["body"])
            else:
                assert message["status"] == 200
                assert (b"content-type", b"text/event-stream; charset=utf-8") in message["headers"]
                assert not any(k == b"content-length" for k, _ in message["headers"])

        await response({"type": "http"}, receive, send)

    asyncio.run(run())
    return sent


def test_sse_response_frames_ping_and_done():
    async def frames():
        yield b"data: 1\n\n"
        await asyncio.sleep(0.25)  # silence: a ping goes out
        yield '{"x": 2}'

    sent = _drive(SSEResponse(frames(), ping_s=0.1))
    assert sent[0] == b"data: 1\n\n" and sent[-2:] == [b'data: {"x": 2}\n\n', DONE_FRAME]
    assert PING_FRAME in sent[1:-2]


def test_sse_disconnect_closes_the_stream():
    state = {"closed": False}

    async def frames():
        try:
            while True:
                yield b"data: x\n\n"
                await asyncio.sleep(0.01)
        finally:
            state["closed"] = True

    sent = _drive(SSEResponse(frames()), disconnect_after=0.1)
    assert state["closed"] and sent and DONE_FRAME not in sent
