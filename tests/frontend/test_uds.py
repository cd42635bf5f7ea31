"""``--uds``: the server listens on a Unix domain socket (the flag, the bind, and uvicorn serving on it)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn
from fastapi import FastAPI

from frontend.api_server import bind_unix_socket
from frontend.config_args import add_config_args, values_from_args
from frontend.server_options import ServerOptions


def test_uds_flag_parsed():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_args(parser, ServerOptions, "server")
    options = ServerOptions(**values_from_args(parser.parse_args(["--uds", "/tmp/x.sock"]), ServerOptions))
    assert options.uds == "/tmp/x.sock"


def test_serves_on_unix_socket_and_replaces_a_stale_one(tmp_path):
    path = str(tmp_path / "pagedserve.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # a leftover socket file from an earlier run
    stale.close()
    sock = bind_unix_socket(path)
    assert sock.family == socket.AF_UNIX
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=10) as client:
            for _ in range(100):
                try:
                    assert client.get("http://localhost/health").json() == {"ok": True}
                    break
                except httpx.ConnectError:
                    time.sleep(0.05)
            else:
                raise AssertionError("no answer on the Unix socket")
    finally:
        server.should_exit = True
        thread.join(10)
