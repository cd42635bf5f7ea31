"""EngineClient against the real engine-core process (tiny random model): the ZMQ path without HTTP."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from core.gc_tuning import GEN0_THRESHOLD
from frontend.engine_client import EngineClient, EngineStartupError, RequestRejectedError
from ipc.messages import EngineConfig, SamplingParams
from tests.frontend.model_files import tiny_llama_dir
from tests.frontend.server_process import pid_alive


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_llama_dir(tmp_path_factory.mktemp("models") / "tiny-llama"))


def test_client_round_trip(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = EngineConfig(model=model_dir, max_model_len=256, num_gpu_blocks_override=64)

    async def run():
        client = EngineClient(config, tokenizer, "tiny")
        ready = await client.start()
        try:
            assert ready.max_model_len == 256 and ready.num_kv_blocks == 64 and ready.vocab_size == 49152
            assert client.is_healthy
            prompt = tokenizer.encode("Hello there")
            greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)

            # Deltas concatenate to the final, non-streamed result.
            deltas = [o async for o in client.generate("a", "Hello there", prompt, greedy)]
            final = [o async for o in client.generate("b", "Hello there", prompt, greedy, final_only=True)]
            assert len(final) == 1 and final[0].finished
            assert "".join(c.text for o in deltas for c in o.outputs) == final[0].outputs[0].text
            assert sum(len(c.token_ids) for o in deltas for c in o.outputs) == 5

            # A request the core refuses comes back as RequestRejectedError, and the core lives on.
            with pytest.raises(RequestRejectedError, match="empty"):
                async for _ in client.generate("c", None, [], greedy):
                    pass
            stats = await client.call_utility("get_stats")
            assert stats["num_running"] == 0
            # The core froze its startup heap (model, kernels) once warm: no collection rescans it between steps.
            gc_info = await client.call_utility("gc_info")
            assert gc_info["frozen_objects"] > 10_000 and gc_info["threshold"][0] == GEN0_THRESHOLD

            # Leaving a stream early aborts the request in the core: its blocks come back.
            long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            async for out in client.generate("d", None, prompt, long):
                break
            for _ in range(100):
                stats = await client.call_utility("get_stats")
                if stats["num_running"] == 0 and stats["kv_cache_usage"] == 0.0:
                    break
                await asyncio.sleep(0.05)
            assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0.0
            with pytest.raises(RuntimeError, match="unknown utility"):
                await client.call_utility("_private")
        finally:
            pid = client.engine_pid
            await client.shutdown()
        assert client._proc.exitcode == 0 and not pid_alive(pid)

    asyncio.run(run())


def test_startup_failure_is_reported(tmp_path):
    config = EngineConfig(model=str(tmp_path / "no-such-model-dir"), load_format="safetensors")

    async def run():
        client = EngineClient(config, None, "missing", startup_timeout_s=120)
        with pytest.raises(EngineStartupError, match="failed to start") as info:
            await client.start()
        await client.shutdown()
        return str(info.value)

    message = asyncio.run(run())
    assert "no-such-model-dir" in message
