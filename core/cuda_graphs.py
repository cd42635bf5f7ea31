"""CUDA graphs for decode-only steps: captured once per bucketed batch size, replayed with the batch padded up to
the next bucket. One replay launches the whole forward pass and the LM head, instead of hundreds of kernels."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator

import torch

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 256, then steps of 16 up to 512; capped by max_num_seqs (which is always
    a bucket itself, so no batch falls past the last one)."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(272, 513, 16))
    capped = [s for s in sizes if s < max_num_seqs]
    return capped + [max_num_seqs] if max_num_seqs <= 512 else capped


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Collect garbage now and let no automatic collection run until the block ends. A collection during a capture
    can free an earlier engine's graphs (cyclic garbage: torch no longer collects when a capture starts), and
    destroying a graph is not permitted while a stream captures: the destroy fails (that graph's memory leaks) and
    the capture under way can fail with it."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def capture_after_warmup(launch: Callable[[], object], warmup: Callable[[], object] | None = None
                         ) -> torch.cuda.CUDAGraph:  # fmt: skip
    """A CUDA graph of ``launch()``, captured after ``warmup()`` (default: ``launch``) ran eagerly on a side stream:
    the warm-up compiles what the graph launches and allocates workspaces, neither of which may happen inside a
    capture. For kernel tests and benchmarks; the engine's graphs share a pool (``DecodeGraphs.capture``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        (warmup or launch)()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with collector_paused(), torch.cuda.graph(graph):
        launch()
    return graph


class DecodeGraphs:
    def __init__(self, forward: Callable[[int], torch.Tensor], max_num_seqs: int, sizes: list[int] | None = None,
                 name: str = "decode") -> None:
        """``forward(b)`` runs the model on the first ``b`` sequences of the runner's static buffers and returns
        logits. ``sizes``: the batch sizes to capture (default: ``graph_batch_sizes(max_num_seqs)``)."""
        self._forward = forward
        self.name = name
        self.sizes = graph_batch_sizes(max_num_seqs) if sizes is None else sizes
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    @property
    def max_size(self) -> int:
        return self.sizes[-1] if self.sizes else 0

    def bucket(self, batch_size: int) -> int | None:
        for size in self.sizes:
            if size >= batch_size:
                return size
        return None

    def capture(self, pool=None) -> None:
        """``pool``: a graph memory pool to share (graphs that never run at the same time)."""
        if not self.sizes:
            return
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if pool is None else pool
        self.pool = pool
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with collector_paused(), torch.cuda.stream(stream):
            for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
                for _ in range(2):  # compile every kernel variant this size needs before capturing
                    self._forward(size)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._outputs[size] = self._forward(size)
                self._graphs[size] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("Captured %d %s CUDA graphs (batch sizes %d..%d) in %.1f s", len(self.sizes), self.name,
                    self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def replay(self, size: int) -> torch.Tensor:
        self._graphs[size].replay()
        return self._outputs[size]
