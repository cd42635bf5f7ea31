"""The multiprocessing executor: ranks 1..N-1 as local worker processes started and supervised by the engine core,
which is rank 0 itself (it samples, so results need no extra hop back).

Each step's ``SchedulerOutput`` is encoded once and written to every worker's pipe before rank 0 launches the step;
the ranks then meet only in torch.distributed collectives. A worker that dies takes the engine down: a watcher
thread kills the other workers and calls ``on_worker_death`` (the engine-core process reports ``EngineDead`` and
exits; the in-process ``LLM`` gets an error from its next step).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections.abc import Callable

import torch

from core.config import resolve_device
from core.distributed.parallel_state import TensorParallelGroup, free_tcp_address, init_parallel
from core.distributed.worker import run_worker_process
from ipc.messages import EngineConfig
from ipc.scheduler_output import FINISH_OLDEST_STEP, SchedulerOutput, encode_scheduler_output

logger = logging.getLogger(__name__)

# Set by the engine-core process: what a worker's death does there (report EngineDead, exit). None: the executor only
# marks itself dead, and the next step raises.
on_worker_death: Callable[[str], None] | None = None


class WorkerDiedError(RuntimeError):
    pass


class MultiprocExecutor:
    def __init__(self, config: EngineConfig) -> None:
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        world_size = tp * pp
        use_cuda = resolve_device(config.device).type == "cuda"
        if not use_cuda and pp > 1:
            # The stages compute at the same time (micro-batches in flight): rank 0 takes its share of the cores
            # like the workers do (core/distributed/worker.py), not an OpenMP pool oversubscribing theirs.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        if use_cuda and world_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} needs {world_size} GPUs; "
                             f"this machine has {torch.cuda.device_count()} (use the ray executor to span nodes).")
        self._first_stage_conns = tp - 1  # ranks 1..tp-1: the first stage's other workers
        init_method = free_tcp_address()
        ctx = multiprocessing.get_context("spawn")
        self._procs: list[multiprocessing.Process] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._stopping = threading.Event()
        self.dead_reason: str | None = None
        try:
            for rank in range(1, world_size):
                receiver, sender = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=run_worker_process, name=f"pagedserve-rank{rank}", daemon=True,
                                   args=(config, rank, init_method, use_cuda, receiver, os.getpid()))
                proc.start()
                receiver.close()
                self._procs.append(proc)
                self._conns.append(sender)
            threading.Thread(target=self._watch, name="worker-watch", daemon=True).start()
            self.group: TensorParallelGroup = init_parallel(0, tp, pp, init_method, use_cuda)
        except BaseException:
            self.shutdown()
            raise
        logger.info("Parallel: tp=%d x pp=%d (%s), workers %s", tp, pp, self.group.backend,
                    [p.pid for p in self._procs])

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def send(self, plan: SchedulerOutput) -> None:
        """Hand the step to every worker (rank 0 runs it in this process next)."""
        if self.dead_reason is not None:
            raise WorkerDiedError(self.dead_reason)
        data = encode_scheduler_output(plan)
        try:
            for conn in self._conns:
                conn.send_bytes(data)
        except OSError as exc:
            raise WorkerDiedError(f"a tensor-parallel worker is gone ({exc})") from exc

    def finish_oldest_step(self) -> None:
        """Pipeline parallelism: the engine samples its oldest micro-batch; the first stage's other ranks compute
        their share of its logits with it (the later stages are done with it)."""
        if self.dead_reason is not None:
            raise WorkerDiedError(self.dead_reason)
        try:
            for conn in self._conns[: self._first_stage_conns]:
                conn.send_bytes(FINISH_OLDEST_STEP)
        except OSError as exc:
            raise WorkerDiedError(f"a tensor-parallel worker is gone ({exc})") from exc

    def _watch(self) -> None:
        sentinels = {p.sentinel: p for p in self._procs}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self._stopping.is_set():
            return
        proc = sentinels[ready[0]]
        proc.join(timeout=1.0)
        reason = f"tensor-parallel worker {proc.name} (pid {proc.pid}) died with exit code {proc.exitcode}"
        logger.error("%s: stopping the engine", reason)
        self.dead_reason = reason
        self._kill_workers()
        if on_worker_death is not None:
            on_worker_death(reason)

    def _kill_workers(self) -> None:
        for proc in self._procs:
            if proc.exitcode is None:
                proc.kill()
        for proc in self._procs:
            proc.join(timeout=5)

    def shutdown(self) -> None:
        """Stop the workers (an empty message, then a kill for any that does not leave) and leave the group."""
        from core.distributed.parallel_state import destroy_parallel

        if self._stopping.is_set():
            return
        self._stopping.set()
        for conn in self._conns:
            try:
                conn.send_bytes(b"")
                conn.close()
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=5)
        self._kill_workers()
        destroy_parallel()


def make_executor(config: EngineConfig):
    """None for one device (the runner stays in this process), else the configured executor. An impossible layout
    fails here, before any worker starts."""
    if config.tensor_parallel_size * config.pipeline_parallel_size == 1:
        return None
    from core.config import ModelConfig
    from core.distributed.tensor_parallel import check_layout
    from core.loader import load_hf_config
    from core.model_source import resolve_model

    model_config = ModelConfig.from_hf_dict(load_hf_config(resolve_model(config.model, config.revision)))
    check_layout(model_config, config.tensor_parallel_size, config.pipeline_parallel_size)
    if config.distributed_executor_backend == "ray":
        from core.distributed.ray_executor import RayExecutor

        return RayExecutor(config)
    return MultiprocExecutor(config)
