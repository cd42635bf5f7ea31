"""Server-sent events written as pre-encoded bytes: the per-token part of a stream costs one JSON string escape.

``sse_starlette`` builds a ``ServerSentEvent`` object per event, splits its data into lines and re-joins them:
microseconds per token that, at 256 streams of W5, are a visible share of the API process (see
``benchmarks/RESULTS.md``). Here a stream's chunk JSON is split once into a constant head (id, object, created,
model) and tail (nulls), so a plain text token is ``head + index + escaped text + tail``, byte-identical to the
msgspec struct's JSON (tested), and the response writes ``data: ...\\n\\n`` frames straight to the ASGI ``send``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE_FRAME = b"data: [DONE]\n\n"
PING_FRAME = b": ping\n\n"
_encode = msgspec.json.Encoder().encode


def sse_frame(data: str | bytes) -> bytes:
    """One SSE event carrying ``data`` (JSON has no raw newlines, so one ``data:`` line is enough)."""
    if isinstance(data, str):
        data = data.encode()
    return b"data: " + data + b"\n\n"


class _ChunkFrames:
    """A stream's constant JSON around the changing text: built once per stream."""

    _object = b""
    _open_choice = b""
    _close_choice = b',"logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}\n\n'

    def __init__(self, request_id: str, created: int, model: str) -> None:
        self._head = (b'data: {"id":' + _encode(request_id) + b',"object":' + self._object + b',"created":'
                      + str(created).encode() + b',"model":' + _encode(model) + b',"choices":[{"index":')

    def text(self, index: int, text: str) -> bytes:
        """The SSE frame of a chunk whose only content is ``text`` for choice ``index``."""
        return self._head + str(index).encode() + self._open_choice + _encode(text) + self._close_choice


class CompletionFrames(_ChunkFrames):
    """``text_completion`` chunks: ``{"index":i,"text":...,"logprobs":null,...}``."""

    _object = b'"text_completion"'
    _open_choice = b',"text":'


class ChatFrames(_ChunkFrames):
    """``chat.completion.chunk`` chunks: ``{"index":i,"delta":{"content":...},"logprobs":null,...}``."""

    _object = b'"chat.completion.chunk"'
    _open_choice = b',"delta":{"content":'
    _close_choice = b"}" + _ChunkFrames._close_choice


class SSEResponse(Response):
    """A ``text/event-stream`` response from an async iterator of frames (bytes, or str JSON to frame), ending with
    ``data: [DONE]``.

    The client's disconnect cancels the writer, whose iterator is then closed (which aborts the request in the core).
    A comment line goes out after ``ping_s`` of silence, so proxies keep the connection open.
    """

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes | str], ping_s: float = 15.0) -> None:
        # Not Response.__init__: it would add content-length: 0 for the empty body.
        self.status_code = 200
        self.background = None
        self.body = b""
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
                            (b"x-accel-buffering", b"no")]
        self.frames = frames
        self.ping_s = ping_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        loop = asyncio.get_running_loop()
        last_sent = loop.time()

        async def write() -> None:
            nonlocal last_sent
            async for frame in self.frames:
                if isinstance(frame, str):
                    frame = sse_frame(frame)
                await send({"type": "http.response.body", "body": frame, "more_body": True})
                last_sent = loop.time()
            await send({"type": "http.response.body", "body": DONE_FRAME, "more_body": False})

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        async def ping() -> None:
            nonlocal last_sent
            while True:
                await asyncio.sleep(max(0.0, last_sent + self.ping_s - loop.time()))
                if loop.time() - last_sent >= self.ping_s:
                    await send({"type": "http.response.body", "body": PING_FRAME, "more_body": True})
                    last_sent = loop.time()

        writer = asyncio.ensure_future(write())
        others = [asyncio.ensure_future(watch_disconnect()), asyncio.ensure_future(ping())]
        try:
            await asyncio.wait([writer, others[0]], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, *others):
                task.cancel()
            await asyncio.gather(writer, *others, return_exceptions=True)
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                await aclose()
        if writer.done() and not writer.cancelled() and writer.exception() is not None:
            raise writer.exception()
