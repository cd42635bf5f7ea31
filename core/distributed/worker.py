"""A tensor-parallel worker: one rank's ``ModelRunner``, fed the engine's ``SchedulerOutput`` messages. The same class
runs inside an mp worker process and inside a Ray actor."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

import torch

from ipc.messages import EngineConfig
from ipc.scheduler_output import FINISH_OLDEST_STEP, decode_scheduler_output

logger = logging.getLogger("pagedserve.worker")

_PARENT_POLL_S = 0.5


class Worker:
    def __init__(self, config: EngineConfig, rank: int, init_method: str, use_cuda: bool,
                 local_rank: int | None = None) -> None:
        """Join the grid as global ``rank`` and load this rank's part of the model (blocks until every rank has
        joined)."""
        from core.distributed.parallel_state import init_parallel
        from core.model_runner import ModelRunner

        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        if not use_cuda:  # the ranks share the machine's cores: one OpenMP pool each, not N oversubscribed ones
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // (tp * pp)))
        self.group = init_parallel(rank, tp, pp, init_method, use_cuda, local_rank)
        self.runner = ModelRunner(config, self.group)
        self._prev = None
        self._in_flight: deque = deque()  # pipeline parallelism, first stage: micro-batches started, not sampled

    def initialize(self) -> int:
        """Size the KV cache with the other ranks (the smallest wins) and allocate it; returns the block count."""
        num_blocks = self.runner.determine_num_blocks()
        self.runner.initialize_kv_cache(num_blocks)
        return num_blocks

    def execute(self, data: bytes) -> None:
        """Run one step (its collectives pair with the other ranks'). With pipeline parallelism: start a
        micro-batch (a later stage runs all of its part now), or ``FINISH_OLDEST_STEP``: the first stage's logits
        for its oldest micro-batch, when the engine samples it."""
        runner = self.runner
        if not runner.pipelined:
            self._prev = runner.launch(decode_scheduler_output(data), self._prev)
        elif data == FINISH_OLDEST_STEP:
            runner.finish_step(self._in_flight.popleft())
        else:
            step = runner.start_step(decode_scheduler_output(data))
            if self.group.is_first_stage:
                self._in_flight.append(step)

    def shutdown(self) -> None:
        from core.distributed.parallel_state import destroy_parallel

        self.runner.kv_caches = []
        destroy_parallel()


def _exit_with_parent(parent_pid: int) -> None:
    """A worker never outlives the engine core, even one killed by a signal mid-collective."""
    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(1)


def run_worker_process(config: EngineConfig, rank: int, init_method: str, use_cuda: bool, conn,
                       parent_pid: int) -> None:
    """Entry point of an mp worker process: load, report ready, then one step per message until an empty one
    (shutdown) or the engine's end of the pipe closing."""
    from core import envs

    logging.basicConfig(level=envs.log_level(), format=f"%(asctime)s %(levelname)s [rank{rank}] %(message)s")
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    worker = Worker(config, rank, init_method, use_cuda)
    worker.initialize()
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            break
        if not data:
            break
        worker.execute(data)
    worker.shutdown()
