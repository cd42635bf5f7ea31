"""ZeroMQ sockets and msgpack codecs between the frontend and the engine-core process.

Two one-way PUSH/PULL pipes over ``ipc://`` files in a private temp directory: frontend -> core carries
``EngineInput``, core -> frontend carries ``EngineMessage``. The frontend binds both (it outlives the core it
starts), the core connects. High-water marks are off: nothing is ever dropped, back-pressure is the scheduler's job.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import msgspec
import zmq

from ipc.messages import EngineInput, EngineMessage


@dataclass(frozen=True)
class IpcAddresses:
    """The two socket addresses and the directory that holds them (removed by ``cleanup``)."""

    directory: str
    input_addr: str  # frontend -> core
    output_addr: str  # core -> frontend

    @classmethod
    def create(cls) -> "IpcAddresses":
        directory = tempfile.mkdtemp(prefix="pagedserve-")
        return cls(directory, f"ipc://{directory}/input.sock", f"ipc://{directory}/output.sock")

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def make_socket(ctx: zmq.Context, addr: str, socket_type: int, bind: bool) -> zmq.Socket:
    sock = ctx.socket(socket_type)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if bind:
        sock.bind(addr)
    else:
        sock.connect(addr)
    return sock


class Encoder:
    """msgpack encoder for any message struct; reuses one buffer-growing encoder."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()

    def encode(self, message: msgspec.Struct) -> bytes:
        return self._encoder.encode(message)


def input_decoder() -> msgspec.msgpack.Decoder:
    """Decodes what the core receives: one of ``EngineInput`` (tagged union)."""
    return msgspec.msgpack.Decoder(EngineInput)


def message_decoder() -> msgspec.msgpack.Decoder:
    """Decodes what the frontend receives: one of ``EngineMessage`` (tagged union)."""
    return msgspec.msgpack.Decoder(EngineMessage)


def parent_alive(parent_pid: int) -> bool:
    """True while the process that started us lives (a reparented child sees another ppid)."""
    return os.getppid() == parent_pid
