"""Run the real ``pagedserve serve`` in a subprocess on a free port, for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; Linux)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry.name))
    return children


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


class ServerProcess:
    def __init__(self, model: str | None, *args: str, api_key: str | None = None, timeout_s: float = 300,
                 wait: bool = True, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "frontend.cli", "serve"] + ([model] if model else [])
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--disable-uvicorn-access-log", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="pagedserve-test-", suffix=".log", delete=False)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        # --api-server-count N: one /health 200 says only that the process that answered is ready; the others
        # may still be loading (503), so wait for every process's "serving" log line too.
        self.api_processes = int(args[args.index("--api-server-count") + 1]) if "--api-server-count" in args else 1
        if wait:
            self.wait_ready(timeout_s)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_text(self) -> str:
        return Path(self.log.name).read_text()

    def wait_ready(self, timeout_s: float = 300) -> None:
        """Until /health answers 200 and every API process logged "serving" (for ``wait=False``: start several
        servers first, then wait for each, so their start-ups overlap)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-5000:]}")
            try:
                if (httpx.get(f"{self.url}/health", timeout=2).status_code == 200
                        and self.log_text().count(" serving ") >= self.api_processes):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout_s} s:\n{self.log_text()[-5000:]}")

    def engine_pid(self) -> int:
        """The engine-core process: the server's ``multiprocessing`` spawn child."""
        pids = [p for p in child_pids(self.proc.pid)
                if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(pids) == 1, f"expected one engine process, found {pids}"
        return pids[0]

    def metrics(self) -> dict[str, float]:
        """Prometheus text parsed into {'name{labels}': value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's series whose labels include ``labels``."""
        total = 0.0
        for key, value in self.metrics().items():
            base = key.split("{", 1)[0]
            if base == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
                total += value
        return total

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
