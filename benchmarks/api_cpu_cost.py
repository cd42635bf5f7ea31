"""CPU the API side spends per streamed token and per request, measured on a real server under load.

Starts ``pagedserve serve MODEL [server args]`` (from ``--repo``, so an older checkout can be measured the same
way), drives it with ``pagedserve bench serve`` (W5's shape, scaled by the flags), and reads the CPU time
(user + system, from /proc) of every process of the server's tree except the engine core: the API process, or the
launcher and its ``--api-server-count`` processes. Robust to a busy machine in a way wall-clock latencies are not.
Also reports tokens per SSE event (1.0 = every token in its own event) and the client's TTFT/ITL.

    python -m benchmarks.api_cpu_cost --model DIR --num-prompts 300 --max-concurrency 256 -- --api-server-count 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
_TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = fields[fields.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def _engine_pid(server_pid: int, log: str) -> int:
    match = re.search(r"engine core pid (\d+)", log)
    if match:
        return int(match.group(1))
    spawned = [p for p in _children(server_pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()
               and b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    if len(spawned) != 1:
        raise RuntimeError(f"cannot tell the engine process among {spawned}")
    return spawned[0]


def _api_pids(server_pid: int, engine_pid: int) -> list[int]:
    return [server_pid] + [p for p in _children(server_pid) if p != engine_pid]


def run(model: str, server_args: list[str], repo: Path, num_prompts: int, concurrency: int, input_len: int,
        output_len: int, port: int) -> dict:
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    env = dict(os.environ, PYTHONPATH=str(repo), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "frontend.cli", "serve", model, "--port", str(port), "--host", "127.0.0.1",
           "--disable-uvicorn-access-log", *server_args]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{Path(log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        time.sleep(1.0)  # every API process of a multi-process server ready
        engine = _engine_pid(proc.pid, Path(log.name).read_text())
        api = _api_pids(proc.pid, engine)
        result_dir = tempfile.mkdtemp()
        bench = [sys.executable, "-m", "benchmarks.serve", "--backend", "vllm", "--port", str(port),
                 "--endpoint", "/v1/completions", "--dataset-name", "random", "--random-input-len", str(input_len),
                 "--random-output-len", str(output_len), "--num-prompts", str(num_prompts), "--max-concurrency",
                 str(concurrency), "--ignore-eos", "--seed", "0", "--tokenizer", model, "--save-result",
                 "--save-detailed", "--no-plots", "--result-dir", result_dir, "--result-filename", "r.json",
                 "--disable-tqdm"]
        cpu_before = {p: _cpu_s(p) for p in api}
        engine_before = _cpu_s(engine)
        subprocess.run(bench, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True,
                       stdout=subprocess.DEVNULL)
        api_cpu = sum(_cpu_s(p) - cpu_before[p] for p in api)
        engine_cpu = _cpu_s(engine) - engine_before
        data = json.loads((Path(result_dir) / "r.json").read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    tokens = data["total_output_tokens"]
    events = sum(len(itl) + 1 for itl, n in zip(data["itls"], data["output_lens"]) if n)
    return {
        "api_processes": len(api), "api_cpu_s": api_cpu, "engine_cpu_s": engine_cpu,
        "api_cpu_us_per_token": api_cpu / max(tokens, 1) * 1e6,
        "api_cpu_us_per_request": api_cpu / max(data["completed"], 1) * 1e6,
        "tokens_per_event": tokens / max(events, 1), "output_tokens": tokens, "completed": data["completed"],
        "duration_s": data["duration"], "request_throughput": data["request_throughput"],
        "output_throughput": data["output_throughput"],
        "max_output_tokens_per_s": data["max_output_tokens_per_s"],
        **{k: data.get(k) for k in ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")},
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args: list[str] = []
    if "--" in argv:
        server_args = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--repo", default=str(REPO), help="checkout whose server is measured")
    parser.add_argument("--num-prompts", type=int, default=300)
    parser.add_argument("--max-concurrency", type=int, default=256)
    parser.add_argument("--random-input-len", type=int, default=512)
    parser.add_argument("--random-output-len", type=int, default=128)
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args(argv)
    result = run(args.model, server_args, Path(args.repo), args.num_prompts, args.max_concurrency,
                 args.random_input_len, args.random_output_len, args.port)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
