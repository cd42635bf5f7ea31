"""This process's place in the tensor x pipeline grid and its collectives, on torch.distributed (NCCL on GPU, gloo on
CPU).

Global rank ``stage * tp + tp_rank``: the ranks of a pipeline stage form a tensor-parallel group; global rank 0 (stage
0, tp rank 0) is the engine core, which samples. Set once by ``init_parallel`` before the model is built; the layers
reach their group through the object the runner hands them. Tensor-parallel collectives are CUDA-graph safe (no host
syncs, fixed shapes).
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class TensorParallelGroup:
    rank: int  # rank inside the tensor-parallel group (this stage's)
    world_size: int  # tensor_parallel_size
    backend: str  # "nccl" or "gloo"
    local_rank: int = 0  # device index on this node
    pp_rank: int = 0  # pipeline stage
    pp_size: int = 1
    process_group: Any = None  # this stage's tensor-parallel group (None: the default group, when pp == 1)
    # pp > 1: the first and last stages' ranks. The final hidden states go back to the first stage through it, so
    # they never queue behind the activations sent forward (on NCCL a communicator orders its send/recv, and one
    # cycle of micro-batches over a single communicator deadlocks).
    return_group: Any = None

    @property
    def global_rank(self) -> int:
        return self.pp_rank * self.world_size + self.rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the tensor-parallel ranks, in place (row-parallel layers' partial products)."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.process_group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n]`` on each tensor-parallel rank -> ``[..., world * n]``, rank 0's columns first."""
        if self.world_size == 1:
            return x
        if self.backend == "nccl":
            out = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x.contiguous(), group=self.process_group)
        else:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(parts, x.contiguous(), group=self.process_group)
            out = torch.stack(parts)
        return out.movedim(0, -2).reshape(*x.shape[:-1], self.world_size * x.shape[-1])

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Global rank 0's ``x`` on every rank of every stage (the sampled token ids: the others feed them to the
        next step)."""
        dist.broadcast(x, src=0)
        return x

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over all ranks (KV blocks: the rank with the least free memory decides)."""
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    # pipeline: activations between stages (same tensor-parallel rank, neighbouring stage), asynchronous so a stage
    # can start the next micro-batch while its output is still on its way; the caller keeps the returned work (and
    # so the tensor) until it is done.
    def isend_next(self, x: torch.Tensor) -> dist.Work:
        return dist.isend(x, dst=self.global_rank + self.world_size)

    def recv_prev(self, x: torch.Tensor) -> torch.Tensor:
        dist.recv(x, src=self.global_rank - self.world_size)
        return x

    def isend_first(self, x: torch.Tensor) -> dist.Work:
        """Last stage -> first stage: the final hidden states, for the LM head and sampling on the engine's stage."""
        return dist.isend(x, dst=self.rank, group=self.return_group)

    def irecv_last(self, x: torch.Tensor) -> dist.Work:
        return dist.irecv(x, src=(self.pp_size - 1) * self.world_size + self.rank, group=self.return_group)


def init_parallel(global_rank: int, tp: int, pp: int, init_method: str, use_cuda: bool,
                  local_rank: int | None = None, timeout_s: float = 600.0) -> TensorParallelGroup:
    """Join the grid (blocks until every rank has joined). On CUDA, this rank uses device ``local_rank``."""
    backend = "nccl" if use_cuda else "gloo"
    local_rank = global_rank if local_rank is None else local_rank
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=init_method, rank=global_rank, world_size=tp * pp,
                            timeout=datetime.timedelta(seconds=timeout_s))
    process_group = None
    if pp > 1:  # every rank creates every stage's group, in the same order
        for stage in range(pp):
            group = dist.new_group(list(range(stage * tp, (stage + 1) * tp)))
            if stage == global_rank // tp:
                process_group = group
        return_group = dist.new_group([*range(tp), *range((pp - 1) * tp, pp * tp)])
    else:
        return_group = None
    return TensorParallelGroup(global_rank % tp, tp, backend, local_rank, global_rank // tp, pp, process_group,
                               return_group)


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_tcp_address(host: str = "127.0.0.1") -> str:
    """A ``tcp://host:port`` rendezvous address on a free port of this machine."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"
