"""The Ray executor: ranks 1..N-1 as Ray actors placed by a placement group (one bundle per device), so a model can
span the nodes of a Ray cluster (``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the others,
then ``pagedserve serve MODEL -tp 8 -pp 2 --distributed-executor-backend ray`` on the head). The actors run the same
``Worker`` as the mp executor's processes; the engine core stays rank 0 and samples.

On GPU, bundle 0 is pinned to the engine's node and held by a placeholder actor, so the GPU Ray reserves for it is
the one rank 0 uses (Ray gives every other actor its own GPU through ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from core.config import resolve_device
from core.distributed.parallel_state import TensorParallelGroup, init_parallel
from ipc.messages import EngineConfig
from ipc.scheduler_output import FINISH_OLDEST_STEP, SchedulerOutput, encode_scheduler_output

logger = logging.getLogger(__name__)

_WATCH_S = 0.5


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("distributed_executor_backend='ray' needs Ray: pip install 'pagedserve[ray]' "
                         "(or pip install ray).") from None
    return ray


class _WorkerActor:
    """The Ray actor around ``core.distributed.worker.Worker`` (created lazily: a placeholder actor never loads)."""

    def __init__(self) -> None:
        self.worker = None

    def pid(self) -> int:
        import os

        return os.getpid()

    def gpu_ids(self) -> list:
        import ray

        return [int(i) for i in ray.get_gpu_ids()]

    def start(self, config: EngineConfig, rank: int, init_method: str, use_cuda: bool) -> None:
        from core.distributed.worker import Worker

        self.worker = Worker(config, rank, init_method, use_cuda, local_rank=0)  # Ray sets CUDA_VISIBLE_DEVICES
        self.worker.initialize()

    def execute(self, data: bytes) -> None:
        self.worker.execute(data)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()


class RayExecutor:
    def __init__(self, config: EngineConfig) -> None:
        ray = _import_ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self._remove_pg = remove_placement_group
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        world_size = tp * pp
        use_cuda = resolve_device(config.device).type == "cuda"
        if not use_cuda and pp > 1:
            # The stages compute at the same time (micro-batches in flight): rank 0 takes its share of the cores
            # like the workers do (core/distributed/worker.py), not an OpenMP pool oversubscribing theirs.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS, else the cluster started on this machine, else a new local one
        driver_ip = ray.util.get_node_ip_address()
        device = {"GPU": 1} if use_cuda else {}
        bundles = [{"CPU": 1, **device} for _ in range(world_size)]
        bundles[0][f"node:{driver_ip}"] = 0.001  # rank 0 is this process: its bundle on this node
        available = ray.cluster_resources()
        need = "GPU" if use_cuda else "CPU"
        if available.get(need, 0) < world_size:
            raise ValueError(f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} needs {world_size} {need}s; "
                             f"the Ray cluster has {available.get(need, 0):g}.")
        self._pg = placement_group(bundles, strategy="PACK")
        ray.get(self._pg.ready(), timeout=300)
        actor_cls = ray.remote(_WorkerActor)
        self._stopping = threading.Event()
        self.dead_reason: str | None = None
        self._pending: list = []
        self._lock = threading.Lock()
        self._tp = tp

        def actor(bundle: int):
            return actor_cls.options(
                num_cpus=1 if not use_cuda else 0, num_gpus=1 if use_cuda else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=bundle),
            ).remote()

        self._placeholder = actor(0) if use_cuda else None  # holds rank 0's GPU reservation
        self._actors = [actor(rank) for rank in range(1, world_size)]
        local_rank = None
        if use_cuda:
            local_rank = ray.get(self._placeholder.gpu_ids.remote())[0]
        port = _free_port()
        init_method = f"tcp://{driver_ip}:{port}"
        try:
            self._pending = [a.start.remote(config, rank, init_method, use_cuda)
                             for rank, a in enumerate(self._actors, start=1)]
            threading.Thread(target=self._watch, name="ray-worker-watch", daemon=True).start()
            self.group: TensorParallelGroup = init_parallel(0, tp, pp, init_method, use_cuda, local_rank)
        except BaseException:
            self.shutdown()
            raise
        logger.info("Parallel (Ray): tp=%d x pp=%d, %d actors, rendezvous %s", tp, pp, len(self._actors), init_method)

    @property
    def worker_pids(self) -> list[int]:
        """The actors' process ids (on their nodes)."""
        return self._ray.get([a.pid.remote() for a in self._actors])

    def send(self, plan: SchedulerOutput) -> None:
        from core.distributed.mp_executor import WorkerDiedError

        if self.dead_reason is not None:
            raise WorkerDiedError(self.dead_reason)
        data = encode_scheduler_output(plan)
        refs = [a.execute.remote(data) for a in self._actors]
        with self._lock:
            self._pending.extend(refs)

    def finish_oldest_step(self) -> None:
        """Pipeline parallelism: the first stage's other ranks compute their share of the oldest micro-batch's
        logits as the engine samples it (see ``MultiprocExecutor.finish_oldest_step``)."""
        from core.distributed.mp_executor import WorkerDiedError

        if self.dead_reason is not None:
            raise WorkerDiedError(self.dead_reason)
        refs = [a.execute.remote(FINISH_OLDEST_STEP) for a in self._actors[: self._tp - 1]]
        with self._lock:
            self._pending.extend(refs)

    def _watch(self) -> None:
        """Surface a failed or dead actor: its refs raise. Then the engine goes down like with a dead mp worker."""
        from core.distributed import mp_executor

        ray = self._ray
        while not self._stopping.is_set():
            with self._lock:
                pending = list(self._pending)
            if not pending:
                self._stopping.wait(_WATCH_S)
                continue
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=_WATCH_S)
            with self._lock:
                done = set(ready)
                self._pending = [r for r in self._pending if r not in done]
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception as exc:
                    if self._stopping.is_set():
                        return
                    reason = f"tensor-parallel worker (Ray actor) failed: {type(exc).__name__}: {exc}"
                    logger.error("%s: stopping the engine", reason)
                    self.dead_reason = reason
                    self._kill_actors()
                    if mp_executor.on_worker_death is not None:
                        mp_executor.on_worker_death(reason)
                    return

    def _kill_actors(self) -> None:
        for a in [*self._actors, *([self._placeholder] if self._placeholder is not None else [])]:
            try:
                self._ray.kill(a)
            except Exception:
                pass

    def shutdown(self) -> None:
        from core.distributed.parallel_state import destroy_parallel

        if self._stopping.is_set():
            return
        self._stopping.set()
        self._kill_actors()
        try:
            self._remove_pg(self._pg)
        except Exception:
            pass
        destroy_parallel()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
