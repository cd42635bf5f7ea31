"""Split a py-spy profile of the API process into the stages of issue 16 (the table in ``benchmarks/RESULTS.md``).

Reads py-spy's raw (folded) output, e.g. from ``PYSPY_OUT=prof.txt benchmarks/run_w5.sh ...``, and charges each
sample to the deepest frame that names a stage: parse, tokenize, engine client, detokenize, stop strings, output
objects, JSON, SSE framing, HTTP (uvicorn + protocol), ASGI middleware, or "other". Samples of the engine-core
process (``--subprocesses``) are left out unless ``--all-processes``.

    python -m benchmarks.profile_stages prof.txt [--tokens N] [--requests N]

With ``--tokens``/``--requests`` (streamed tokens and requests during the profile) it also prints µs per token
and per request, given the sampling ``--rate``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

# (stage, pattern on "function (file:line)"), deepest matching frame wins; first rule wins within a frame.
STAGE_RULES: list[tuple[str, re.Pattern]] = [(stage, re.compile(pattern)) for stage, pattern in [
    ("tokenize", r"core/tokenizer\.py|\bencode \(|_tokenize|render_chat|chat_template"),
    ("parse (pydantic body)", r"_parse_body|model_validate|pydantic|to_sampling_params|check_request_limits"),
    ("stop strings", r"StopStringMatcher"),
    ("detokenize", r"IncrementalDetokenizer|batch_detokenize|SequenceText|_decode_fn|TokenStrings"),
    ("output objects", r"output_processor\.py|_merge_queued_deltas"),
    ("engine client (zmq, msgpack)", r"engine_client\.py|zmq|msgpack|transport\.py"),
    ("JSON chunk", r"to_json|stream_frames\.py:\d+\)$|_ChunkFrames|msgspec"),
    ("SSE framing", r"SSEResponse|sse_starlette|sse_frame"),
    ("serving (endpoint code)", r"serving_(completion|chat|common)\.py"),
    ("ASGI middleware / routing", r"starlette|fastapi|middleware|api_server\.py|lifecycle\.py|serving_misc"),
    ("HTTP (uvicorn protocol)", r"uvicorn|httptools|h11"),
    ("metrics", r"metrics\.py|prometheus"),
    ("event loop", r"asyncio|uvloop"),
]]
_ENGINE = re.compile(r"run_engine_core|engine_process\.py|EngineCore|model_runner")


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, pattern in STAGE_RULES:
            if pattern.search(frame):
                return stage
    return "other"


def split(lines: list[str], all_processes: bool = False) -> Counter:
    counts: Counter = Counter()
    for line in lines:
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not all_processes and any(_ENGINE.search(f) for f in frames):
            continue
        counts[stage_of(frames)] += int(count)
    return counts


def format_table(counts: Counter, rate: float, tokens: int | None, requests: int | None) -> str:
    total = sum(counts.values()) or 1
    header = "| stage | samples | share |" + (" µs/token |" if tokens else "") + (" µs/request |" if requests else "")
    lines = [header, "|---|---:|---:|" + ("---:|" if tokens else "") + ("---:|" if requests else "")]
    for stage, n in counts.most_common():
        row = f"| {stage} | {n} | {100 * n / total:.1f}% |"
        if tokens:
            row += f" {n / rate / tokens * 1e6:.1f} |"
        if requests:
            row += f" {n / rate / requests * 1e6:.0f} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="py-spy raw output (--format raw)")
    parser.add_argument("--rate", type=float, default=250.0, help="py-spy's --rate (samples per second)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens streamed during the profile")
    parser.add_argument("--requests", type=int, default=None, help="requests admitted during the profile")
    parser.add_argument("--all-processes", action="store_true")
    args = parser.parse_args(argv)
    with open(args.profile) as f:
        counts = split(f.readlines(), args.all_processes)
    print(format_table(counts, args.rate, args.tokens, args.requests))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
