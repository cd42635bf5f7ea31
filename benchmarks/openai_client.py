"""One streaming request to an OpenAI-compatible server, timed token by token.

Kept lean because at concurrency 256 the client itself must keep up with ~10k SSE events a second: raw bytes are
split into lines by hand (no per-line readline), JSON is decoded with msgspec, and the clock is read once per
network read, not once per event.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode


@dataclass
class RequestOutput:
    """What one request measured. Times are ``time.perf_counter()`` seconds; latencies are seconds."""

    prompt_len: int
    expected_output_len: int
    success: bool = False
    started: bool = False
    cancelled: bool = False
    error: str = ""
    generated_text: str = ""
    start_time: float = 0.0
    end_time: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int | None = None  # from the server's usage, when it sends one
    server_prompt_tokens: int | None = None
    finish_reason: str | None = None


@dataclass
class RequestSpec:
    """Everything the wire needs for one request."""

    api_url: str
    model: str
    chat: bool
    prompt: str
    messages: list[dict[str, Any]] | None
    prompt_len: int
    max_tokens: int
    ignore_eos: bool
    sampling: dict[str, Any]
    headers: dict[str, str]
    extra_body: dict[str, Any] | None = None


def build_payload(spec: RequestSpec) -> dict[str, Any]:
    """The JSON body. ``ignore_eos`` is a vLLM extra that OpenAI-compatible servers (ours, vLLM, SGLang) accept."""
    body: dict[str, Any] = {"model": spec.model, "stream": True, "stream_options": {"include_usage": True}}
    if spec.chat:
        body["messages"] = spec.messages or [{"role": "user", "content": spec.prompt}]
        body["max_completion_tokens"] = spec.max_tokens
    else:
        body["prompt"] = spec.prompt
        body["max_tokens"] = spec.max_tokens
    body.update(spec.sampling)
    if spec.ignore_eos:
        body["ignore_eos"] = True
    if spec.extra_body:
        body.update(spec.extra_body)
    return body


async def send_request(session: aiohttp.ClientSession, spec: RequestSpec, out: RequestOutput) -> RequestOutput:
    """Stream one request into ``out`` (filled in place, so a cancelled request keeps what it had measured)."""
    body = _json_encode(build_payload(spec))
    headers = {"Content-Type": "application/json", **spec.headers}
    stream = _StreamParser(out, spec.chat)
    out.started = True
    out.start_time = stream.start = stream.last = time.perf_counter()
    try:
        async with session.post(spec.api_url, data=body, headers=headers) as response:
            if response.status != 200:
                out.error = _http_error(response.status, await response.text())
                return out
            buffer = b""
            async for raw in response.content.iter_any():
                now = time.perf_counter()
                buffer += raw
                if b"\n" in raw:
                    *lines, buffer = buffer.split(b"\n")
                    stream.feed(lines, now)
                    if out.error:
                        return out
            if buffer.strip():
                stream.feed([buffer], time.perf_counter())
        stream.finish()
    except asyncio.CancelledError:
        out.cancelled = True
        out.generated_text = "".join(stream.pieces)
        raise
    except msgspec.DecodeError as e:
        out.error = f"bad JSON in stream: {e}"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        out.error = f"{type(e).__name__}: {e}".rstrip(": ")
    finally:
        out.end_time = time.perf_counter()
    return out


class _StreamParser:
    """Turns SSE ``data:`` lines into token arrival times, text, usage and errors on a RequestOutput."""

    __slots__ = ("out", "chat", "start", "last", "pieces", "done")

    def __init__(self, out: RequestOutput, chat: bool):
        self.out, self.chat = out, chat
        self.start = self.last = 0.0
        self.pieces: list[str] = []
        self.done = False

    def feed(self, lines: list[bytes], now: float) -> None:
        out = self.out
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (": ping"), event/id fields
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True  # keep reading to the end of the body so the connection can be reused
                continue
            event = _json_decode(data)
            if not isinstance(event, dict):
                continue
            if "error" in event and not event.get("choices"):
                out.error = "stream error: " + _error_text(event["error"])
                return
            choices = event.get("choices")
            if choices:
                choice = choices[0]
                text = _choice_text(choice, self.chat)
                finish = choice.get("finish_reason")
                if finish:
                    out.finish_reason = finish
                # a chunk with no text that only closes the stream is not a token arrival
                if text is not None and (text or not finish):
                    if out.chunk_times:
                        out.itl.append(now - self.last)
                    else:
                        out.ttft = now - self.start
                    out.chunk_times.append(now)
                    self.last = now
                    self.pieces.append(text)
            usage = event.get("usage")
            if usage:
                out.output_tokens = usage.get("completion_tokens")
                out.server_prompt_tokens = usage.get("prompt_tokens")

    def finish(self) -> None:
        out = self.out
        if out.error:
            return
        out.generated_text = "".join(self.pieces)
        if not out.chunk_times:
            out.error = "stream ended without any output token"
        elif not self.done:
            out.error = "stream ended before data: [DONE]"
        else:
            out.latency = self.last - self.start
            out.success = True


def _choice_text(choice: dict[str, Any], chat: bool) -> str | None:
    """The text a chunk carries; None for chunks that carry no token (chat's role-only opener)."""
    if not chat:
        return choice.get("text")
    delta = choice.get("delta") or {}
    text = delta.get("content")
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    if reasoning:
        text = reasoning + (text or "")
    if text is None or (text == "" and "role" in delta):
        return None
    return text


def _http_error(status: int, body: str) -> str:
    message = body.strip()
    try:
        parsed = _json_decode(message)
        if isinstance(parsed, dict) and "error" in parsed:
            message = _error_text(parsed["error"])
        elif isinstance(parsed, dict) and "detail" in parsed:
            message = str(parsed["detail"])
    except msgspec.DecodeError:
        pass
    return f"HTTP {status}: {message[:300]}" if message else f"HTTP {status}"


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


async def fetch_models(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]) -> list[str]:
    """The ids the server lists at /v1/models (to default --model, as vLLM does)."""
    async with session.get(f"{base_url}/v1/models", headers=headers) as response:
        if response.status != 200:
            raise ValueError(f"{base_url}/v1/models answered {_http_error(response.status, await response.text())};"
                             " pass --model (and --api-key if the server needs one)")
        data = await response.json(content_type=None)
    return [m["id"] for m in data.get("data", []) if isinstance(m, dict) and "id" in m]


async def wait_until_up(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str], timeout: float) -> None:
    """Wait for the server to answer HTTP at all (any status): errors after that are the benchmark's to report."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with session.get(f"{base_url}/v1/models", headers=headers) as response:
                await response.read()
                return
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"no server answered at {base_url} within {timeout:.0f} s: {e}") from None
        await asyncio.sleep(0.5)
