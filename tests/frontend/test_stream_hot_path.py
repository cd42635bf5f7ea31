"""The streaming hot path's shortcuts give exactly what the plain code gives: pre-encoded frames (byte-identical
JSON), batched detokenization (same text), the stop-string holdback (same lengths)."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from frontend.detokenizer import StopStringMatcher
from frontend.output_processor import OutputProcessor
from frontend.protocol import (
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
)
from frontend.stream_frames import ChatFrames, CompletionFrames, sse_frame
from ipc.messages import EngineOutput, FinishReason, SamplingParams
from tests.frontend.model_files import tokenizer_dir

TEXTS = ["", " word", 'quote " and \\ backslash', "new\nline\ttab", "é中文🙂", "\u2028\x00\x1f"]


@pytest.mark.parametrize("text", TEXTS)
def test_frames_equal_struct_json(text):
    for request_id, model in (("cmpl-1", "m"), ('we"ird', "mödel/x")):
        completion = CompletionStreamResponse(id=request_id, created=17, model=model,
                                              choices=[CompletionStreamChoice(index=3, text=text)]).to_json()
        assert CompletionFrames(request_id, 17, model).text(3, text) == sse_frame(completion)
        chat = ChatCompletionStreamResponse(id=request_id, created=17, model=model, choices=[
            ChatCompletionStreamChoice(index=0, delta=DeltaMessage(content=text))]).to_json()
        frame = ChatFrames(request_id, 17, model).text(0, text)
        assert frame == sse_frame(chat)
        assert json.loads(frame[len(b"data: "):])["choices"][0]["delta"]["content"] == text


def test_holdback_matches_every_tail_check():
    def reference(stop: list[str], text: str) -> int:
        longest = min(max(len(s) for s in stop) - 1, len(text))
        for k in range(longest, 0, -1):
            if any(s.startswith(text[-k:]) for s in stop):
                return k
        return 0

    rng = random.Random(0)
    for _ in range(20000):
        stop = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("ab\nc") for _ in range(rng.randint(0, 8)))
        assert StopStringMatcher(stop, False).holdback(text) == reference(stop, text), (stop, text)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(tmp_path_factory.mktemp("tok"))))




def test_batched_detokenize_gives_the_same_text(tokenizer):
    """Random ids (byte pieces that split UTF-8 characters included), special tokens skipped and not, stop strings,
    a stop token at the end, and a step of two tokens (the per-sequence fallback)."""
    rng = random.Random(1)
    vocab = tokenizer.vocab_size
    params = [SamplingParams(max_tokens=40), SamplingParams(max_tokens=40, skip_special_tokens=False),
              SamplingParams(max_tokens=40, stop=["e", "th"]), SamplingParams(max_tokens=40, n=2)]
    steps = []
    for t in range(40):
        step = []
        for i, p in enumerate(params):
            for index in range(p.n):
                ids = [rng.randrange(vocab) if rng.random() < 0.8 else rng.randrange(20)]
                if t == 7 and i == 0:
                    ids.append(rng.randrange(vocab))
                finish = None
                if t == 39:
                    finish = FinishReason.STOP if i == 1 else FinishReason.LENGTH
                step.append(EngineOutput(f"r{i}", ids, index=index, finish_reason=finish))
        steps.append(step)

    def collect(batched: bool) -> list[list[str]]:
        processor = OutputProcessor(tokenizer, batched_detokenize=batched)
        assert (processor._batch_decoder is not None) == batched
        queues = []
        prompt = tokenizer.encode("Once upon a time")
        for i, p in enumerate(params):
            queues.append(asyncio.Queue())
            processor.add_request(f"r{i}", None, prompt, p, stream_deltas=True, queue=queues[-1])
        for step in steps:
            processor.process_outputs(step)
        out = []
        for q in queues:
            deltas = []
            while not q.empty():
                deltas.append([(c.index, c.text, c.finish_reason) for c in q.get_nowait().outputs])
            out.append(deltas)
        return out

    plain, batched = collect(False), collect(True)
    assert plain == batched
    assert any(text for deltas in plain for step in deltas for _, text, _ in step)
