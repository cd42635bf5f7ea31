"""The tensor-parallel group of this process and its collectives, on torch.distributed (NCCL on GPU, gloo on CPU).

One group per process, set once by ``init_tensor_parallel`` before the model is built; the layers reach it through
``get_tp_group`` (vLLM keeps the same module-level state: layers deep in a model need it without threading it through
every constructor). Every collective here is CUDA-graph safe: no host syncs, fixed shapes.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TensorParallelGroup:
    rank: int
    world_size: int
    backend: str  # "nccl" or "gloo"
    local_rank: int = 0  # device index on this node

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks, in place (row-parallel layers' partial products)."""
        dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n]`` on each rank -> ``[..., world * n]``, rank 0's columns first."""
        if self.backend == "nccl":
            out = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x.contiguous())
        else:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(parts, x.contiguous())
            out = torch.stack(parts)
        return out.movedim(0, -2).reshape(*x.shape[:-1], self.world_size * x.shape[-1])

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank (the sampled token ids: other ranks feed them to the next step)."""
        dist.broadcast(x, src=0)
        return x

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (KV blocks: the rank with the least free memory decides)."""
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


_TP_GROUP: TensorParallelGroup | None = None


def get_tp_group() -> TensorParallelGroup | None:
    """This process's tensor-parallel group, or None when the model is not split."""
    return _TP_GROUP


def init_tensor_parallel(rank: int, world_size: int, init_method: str, use_cuda: bool,
                         local_rank: int | None = None, timeout_s: float = 600.0) -> TensorParallelGroup:
    """Join the group (blocks until every rank has joined). On CUDA, rank ``local_rank`` uses that device."""
    global _TP_GROUP
    backend = "nccl" if use_cuda else "gloo"
    local_rank = rank if local_rank is None else local_rank
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _TP_GROUP = TensorParallelGroup(rank, world_size, backend, local_rank)
    return _TP_GROUP


def destroy_tensor_parallel() -> None:
    global _TP_GROUP
    _TP_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


def free_tcp_address(host: str = "127.0.0.1") -> str:
    """A ``tcp://host:port`` rendezvous address on a free port of this machine."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"

