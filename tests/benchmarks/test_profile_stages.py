"""benchmarks/profile_stages.py charges each py-spy sample to the deepest frame that names a stage."""

from __future__ import annotations

from benchmarks.profile_stages import format_table, split

ROOT = "main (frontend/cli.py:113);run (uvloop/__init__.py:92);Runner.run (asyncio/runners.py:118)"
LINES = [
    f"{ROOT};RequestResponseCycle.run_asgi (uvicorn/protocols/http/httptools_impl.py:422);"
    "Starlette.__call__ (starlette/applications.py:96);SSEResponse.__call__.<locals>.write "
    "(frontend/stream_frames.py:89);CompletionServing._stream (frontend/serving_completion.py:199);"
    "EngineClient.generate (frontend/engine_client.py:272) 3\n",
    f"{ROOT};EngineClient._output_loop (frontend/engine_client.py:300);OutputProcessor.process_outputs "
    "(frontend/output_processor.py:300);SequenceText.add_tokens (frontend/detokenizer.py:203);"
    "IncrementalDetokenizer.decode_next (frontend/detokenizer.py:90) 5\n",
    f"{ROOT};OutputProcessor._delta (frontend/output_processor.py:415);StopStringMatcher.holdback "
    "(frontend/detokenizer.py:150) 2\n",
    "Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:83);encode (core/tokenizer.py:56) 7\n",
    f"{ROOT} 4\n",
    "run_engine_core (core/engine_process.py:250);EngineProcess.run (core/engine_process.py:120) 100\n",
]


def test_samples_land_in_their_stages_and_the_engine_is_left_out():
    counts = split(LINES)
    assert counts == {"engine client (zmq, msgpack)": 3, "detokenize": 5, "stop strings": 2, "tokenize": 7,
                      "event loop": 4}
    assert split(LINES, all_processes=True)["other"] == 100
    table = format_table(counts, rate=100.0, tokens=10, requests=2)
    assert "| tokenize | 7 | 33.3% | 7000.0 | 35000 |" in table
