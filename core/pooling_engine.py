"""EngineCore for embedding (pooling) models: requests in, one embedding per request out.

Same shape as ``core.engine.EngineCore`` (add_request / abort_requests / step / ...), so the engine process and the
offline ``LLM`` drive either. Each request is one ``Sequence`` through the ``Scheduler``'s queues with a prefill-only
admission rule (``PoolingScheduler``): a prompt is scheduled whole, is computed in one step and finishes in that step,
holding no KV blocks. ``create_engine_core`` picks the engine for the model and ``task``.
"""

from __future__ import annotations

import logging
import time

from core.config import resolve_task
from core.kv_cache import KVCacheManager
from core.loader import load_hf_config
from core.model_source import resolve_model
from core.pooling_runner import PoolingRunner
from core.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from core.sequence import Sequence, SequenceStatus
from ipc.config import EngineConfig
from ipc.messages import EngineOutput, EngineOutputs, EngineRequest, FinishReason, ReadyMessage

logger = logging.getLogger(__name__)


def create_engine_core(config: EngineConfig):
    """A ``PoolingEngineCore`` when the model embeds (an encoder, or ``task="embed"``), else the ``EngineCore``."""
    if resolve_task(config, load_hf_config(resolve_model(config.model, config.revision))) == "embed":
        return PoolingEngineCore(config)
    from core.engine import EngineCore

    return EngineCore(config)


class PoolingScheduler(Scheduler):
    """Prefill-only scheduling: waiting sequences in arrival order, each whole (there is no KV cache to resume a
    chunk from), while the token budget and ``max_num_seqs`` allow. No blocks are allocated."""

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        while self.waiting and len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_prompt_tokens > budget:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = seq.num_prompt_tokens
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, 0, seq.num_prompt_tokens, True, 0))
            budget -= seq.num_prompt_tokens
        freed, self._freed_keys = self._freed_keys, []
        return SchedulerOutput(scheduled, self.max_num_batched_tokens - budget, [], freed)


class PoolingEngineCore:
    def __init__(self, config: EngineConfig) -> None:
        if config.tensor_parallel_size * config.pipeline_parallel_size > 1:
            raise ValueError("Embedding models run on one device: tensor_parallel_size and pipeline_parallel_size "
                             "must be 1 with task embed.")
        self.config = config
        start = time.perf_counter()
        self.runner = PoolingRunner(config)
        self.max_model_len = self.runner.max_model_len
        self.kv = KVCacheManager(2, config.block_size, enable_caching=False)  # the scheduler's bookkeeping only
        self.scheduler = PoolingScheduler(self.kv, max_num_seqs=config.max_num_seqs,
                                          max_num_batched_tokens=self.runner.max_num_batched_tokens)
        self._sequences: dict[str, Sequence] = {}  # request id -> its one sequence (no n > 1: one embedding each)
        self._pending: list[EngineOutput] = []
        self.total_prompt_tokens = 0
        self.startup_seconds = time.perf_counter() - start
        logger.info("Embedding engine ready in %.1f s: max_model_len=%d, %d-dimensional embeddings.",
                    self.startup_seconds, self.max_model_len, self.runner.hidden_size)

    def ready_message(self) -> ReadyMessage:
        return ReadyMessage(model=self.runner.source.name, max_model_len=self.max_model_len, num_kv_blocks=0,
                            block_size=self.config.block_size, vocab_size=self.runner.vocab_size, eos_token_ids=[],
                            device=str(self.runner.device), embedding=self.runner.embedding_info())

    def add_request(self, request: EngineRequest) -> None:
        prompt = request.prompt_token_ids
        if request.request_id in self._sequences:
            raise ValueError(f"Request id '{request.request_id}' is already in use.")
        if not prompt:
            raise ValueError("The input is empty.")
        if len(prompt) > self.max_model_len:
            raise ValueError(f"The input has {len(prompt)} tokens, more than the model's maximum of "
                             f"{self.max_model_len}.")
        if min(prompt) < 0 or max(prompt) >= self.runner.vocab_size:
            raise ValueError(f"Token ids must be in [0, {self.runner.vocab_size}).")
        seq = Sequence(request.request_id, prompt, request.sampling_params, max_model_len=self.max_model_len)
        self._sequences[request.request_id] = seq
        self.total_prompt_tokens += len(prompt)
        self.scheduler.add_sequence(seq)

    def abort_requests(self, request_ids: list[str], indices: list[int] | None = None) -> None:
        for request_id in request_ids:
            seq = self._sequences.pop(request_id, None)
            if seq is not None and not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
                self._pending.append(EngineOutput(request_id, [], finish_reason=FinishReason.ABORT))

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_sequences() or bool(self._pending)

    def step(self) -> EngineOutputs:
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if sched.scheduled:
            seqs = [s.seq for s in sched.scheduled]
            embeddings = self.runner.embed([seq.prompt_token_ids for seq in seqs])
            for seq, vector in zip(seqs, embeddings):
                self.scheduler.finish(seq, FinishReason.STOP)
                self._sequences.pop(seq.request_id, None)
                outputs.append(EngineOutput(seq.request_id, [], finish_reason=FinishReason.STOP,
                                            embedding=vector.tobytes()))
        return EngineOutputs(outputs, self.scheduler.stats(), timestamp=time.time())

    def reset_prefix_cache(self) -> bool:
        return False  # nothing is cached: every prompt is computed whole

    def get_stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": 0.0,
            "num_free_blocks": 0,
            "num_kv_blocks": 0,
            "total_preemptions": 0,
            "prefix_cache_queries": 0,
            "prefix_cache_hits": 0,
            "total_prompt_tokens": self.total_prompt_tokens,
            "total_generation_tokens": 0,
        }

    def shutdown(self) -> None:
        pass
