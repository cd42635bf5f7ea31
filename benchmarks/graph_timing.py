"""Kernel timing inside one CUDA graph of per-layer launches (the attention benchmarks' shared harness)."""

from __future__ import annotations

from typing import Callable

import torch

from core.cuda_graphs import capture_after_warmup


def median_us_per_launch(launch: Callable[[int], object], layers: int, warm_layers: int | None = None,
                         replays: int = 10, rounds: int = 5) -> float:  # fmt: skip
    """Median microseconds per ``launch(layer)`` over ``rounds`` of ``replays`` replays of one graph of ``layers``
    launches. The eager warm-up (``warm_layers``, default ``layers``) runs on a side stream first: it compiles what
    the graph launches and allocates workspaces outside the capture. Tensors written by the launches hold the last
    replay's results on return."""

    def launches(count: int) -> None:
        for layer in range(count):
            launch(layer)

    warm = layers if warm_layers is None else warm_layers
    graph = capture_after_warmup(lambda: launches(layers), lambda: launches(warm))
    for _ in range(3):
        graph.replay()
    timings = []
    for _ in range(rounds):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        timings.append(begin.elapsed_time(end) * 1e3 / (replays * layers))
    del graph
    return sorted(timings)[len(timings) // 2]
