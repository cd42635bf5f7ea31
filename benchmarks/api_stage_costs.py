"""Cost of the API process's stages, per admitted request and per streamed token (W5's shape), measured in-process.

The API process is a single event loop: whatever it spends per token, times the tokens per second the engine
makes, is its ceiling. This runs each stage of the real code on W5-shaped data (512-token random prompts, 256
streams advancing one token a step) and prints microseconds per request / per token, so the table in
``benchmarks/RESULTS.md`` can be reproduced on any machine:

    python -m benchmarks.api_stage_costs --tokenizer tests/data/smollm2-135m   # or a model directory

Stages: parse (pydantic body), tokenize, engine client (msgpack encode/decode, request state), detokenize
(incremental, per sequence; and batched, one tokenizer call per step), stop strings, JSON chunk, SSE framing
(sse-starlette's per-event encoder and our pre-encoded frame). The HTTP layer (uvicorn h11 vs httptools) is
timed with ``--http`` against a running server instead (see ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import msgspec

from core.tokenizer import encode
from frontend.output_processor import OutputProcessor
from frontend.protocol import CompletionRequest, CompletionStreamChoice, CompletionStreamResponse
from frontend.stream_frames import CompletionFrames, sse_frame
from ipc.messages import EngineOutput, EngineOutputs, EngineRequest, SamplingParams
from ipc.transport import Encoder, message_decoder


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    src = Path(path)
    if (src / "tokenizer.json.gz").is_file() and not (src / "tokenizer.json").is_file():
        tmp = Path(tempfile.mkdtemp())
        for f in src.iterdir():
            if f.name != "tokenizer.json.gz":
                shutil.copyfile(f, tmp / f.name)
        with gzip.open(src / "tokenizer.json.gz", "rb") as fin, open(tmp / "tokenizer.json", "wb") as fout:
            shutil.copyfileobj(fin, fout)
        src = tmp
    return AutoTokenizer.from_pretrained(str(src))


def _time_us(fn: Callable[[], Any], repeat: int) -> float:
    """Best of 3 runs of ``repeat`` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best * 1e6


def measure(tokenizer: Any, streams: int = 256, input_len: int = 512, steps: int = 32,
            seed: int = 0) -> dict[str, float]:
    """Microseconds per request (keys ``request/...``) and per streamed token (``token/...``)."""
    rng = random.Random(seed)
    vocab = tokenizer.vocab_size
    prompt_ids = [rng.randrange(1000, vocab) for _ in range(input_len)]
    prompt = tokenizer.decode(prompt_ids)
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 128, "stream": True, "ignore_eos": True,
                       "temperature": 0.0}).encode()
    results: dict[str, float] = {}
    results["request/parse (pydantic)"] = _time_us(lambda: CompletionRequest.model_validate_json(body), 50)
    results["request/tokenize"] = _time_us(lambda: encode(tokenizer, prompt), 20)
    request = CompletionRequest.model_validate_json(body)
    params = request.to_sampling_params(input_len, 4096, {}, 20, vocab)
    results["request/sampling params"] = _time_us(lambda: request.to_sampling_params(input_len, 4096, {}, 20, vocab),
                                                   200)
    encoder = Encoder()
    results["request/engine client (encode)"] = _time_us(
        lambda: encoder.encode(EngineRequest("cmpl-1", prompt_ids, params)), 200)
    processor = OutputProcessor(tokenizer)
    counter = iter(range(10**9))
    results["request/request state"] = _time_us(lambda: processor.add_request(
        f"r{next(counter)}", prompt, prompt_ids, params, stream_deltas=True), 200)

    # Per-token stages: `steps` steps of `streams` sequences advancing one token each.
    token_steps = [[rng.randrange(1000, vocab) for _ in range(streams)] for _ in range(steps)]
    frames = [encoder.encode(EngineOutputs(outputs=[EngineOutput(f"cmpl-{i}", [tok]) for i, tok in enumerate(row)]))
              for row in token_steps]
    decoder = message_decoder()
    n_tokens = streams * steps

    def decode_all() -> None:
        for frame in frames:
            decoder.decode(frame)

    results["token/engine client (msgpack decode)"] = _time_us(decode_all, 3) / n_tokens

    def process(stop: list[str] | None, batched: bool) -> float:
        best = float("inf")
        for _ in range(3):
            proc = OutputProcessor(tokenizer, batched_detokenize=batched)
            p = msgspec.structs.replace(params, stop=stop)
            queues = []
            for i in range(streams):
                queues.append(asyncio.Queue())
                proc.add_request(f"cmpl-{i}", None, prompt_ids, p, stream_deltas=True, queue=queues[-1])
            messages = [decoder.decode(frame) for frame in frames]
            start = time.perf_counter()
            for message in messages:
                proc.process_outputs(message.outputs)
            best = min(best, time.perf_counter() - start)
        return best * 1e6 / n_tokens

    plain = process(None, batched=False)
    with_stops = process(["\n\n", "###"], batched=False)
    batched = process(None, batched=True)
    # Detokenize alone: the same sequences through IncrementalDetokenizer.
    from frontend.detokenizer import IncrementalDetokenizer

    def detok_only() -> float:
        best = float("inf")
        for _ in range(3):
            detoks = [IncrementalDetokenizer(tokenizer, prompt_ids) for _ in range(streams)]
            start = time.perf_counter()
            for row in token_steps:
                for d, tok in zip(detoks, row):
                    d.decode_next(tok)
            best = min(best, time.perf_counter() - start)
        return best * 1e6 / n_tokens

    detok = detok_only()
    results["token/detokenize (per sequence)"] = detok
    results["token/detokenize + output objects + queue (per sequence)"] = plain
    results["token/  of which output objects + queue"] = plain - detok
    results["token/detokenize + output objects + queue (batched)"] = batched
    results["token/stop strings (2 strings)"] = with_stops - plain

    choice = CompletionStreamChoice(index=0, text=" word")
    results["token/JSON chunk (msgspec struct)"] = _time_us(lambda: CompletionStreamResponse(
        id="cmpl-1", created=1, model="m", choices=[CompletionStreamChoice(index=0, text=" word")]).to_json(), 2000)
    del choice
    fast = CompletionFrames("cmpl-1", 1, "m")
    results["token/JSON chunk (pre-encoded frame)"] = _time_us(lambda: fast.text(0, " word"), 2000)
    from sse_starlette.event import ServerSentEvent

    data = CompletionStreamResponse(id="cmpl-1", created=1, model="m",
                                    choices=[CompletionStreamChoice(index=0, text=" word")]).to_json()
    results["token/SSE framing (sse-starlette)"] = _time_us(lambda: ServerSentEvent(data=data, sep="\n").encode(),
                                                             2000)
    results["token/SSE framing (pre-encoded)"] = _time_us(lambda: sse_frame(data), 2000)
    return results


def format_table(results: dict[str, float]) -> str:
    lines = ["| stage | µs |", "|---|---:|"]
    for key, value in results.items():
        lines.append(f"| {key} | {value:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="tests/data/smollm2-135m")
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args(argv)
    results = measure(_load_tokenizer(args.tokenizer), args.streams, args.input_len, args.steps)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
