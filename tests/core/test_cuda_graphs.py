"""CUDA graph capture and the garbage collector: cyclic garbage holding an earlier engine's graphs must not be
collected while a stream captures (destroying a graph is not permitted then)."""

from __future__ import annotations

import gc

import pytest
import torch

from core.cuda_graphs import DecodeGraphs, collector_paused


class Cycle:
    """An object in a reference cycle: only the collector frees it."""

    def __init__(self, payload: object) -> None:
        self.payload = payload
        self.me = self


def test_collector_paused_collects_first_and_restores_the_collector():
    freed = []
    cycle = Cycle(None)
    gc.collect()
    gc.callbacks.append(lambda phase, info: phase == "stop" and freed.append(info["collected"]))
    try:
        del cycle
        with pytest.raises(RuntimeError), collector_paused():
            assert not gc.isenabled()
            raise RuntimeError("capture failed")
    finally:
        gc.callbacks.pop()
    assert gc.isenabled()
    assert sum(freed) >= 1  # the block's own collection freed the cycle (none ran inside it: disabled)


def test_collector_paused_leaves_a_disabled_collector_disabled():
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_survives_an_earlier_engines_graphs_becoming_garbage():
    """Garbage graphs exist when the capture starts and the collector would run at every allocation: the capture
    succeeds, replays correctly, and the earlier graphs are freed (before it, not during it)."""
    x = torch.randn(64, 64, device="cuda")
    earlier = DecodeGraphs(lambda b: x[:b] * 2, max_num_seqs=8)
    earlier.capture()
    Cycle(earlier)
    del earlier
    threshold = gc.get_threshold()
    gc.set_threshold(1)  # a collection at (nearly) every allocation, as a busy process might hit mid-capture
    try:
        graphs = DecodeGraphs(lambda b: (x[:b] @ x[:b].T).sum(dim=1, keepdim=True) + torch.ones(b, 1, device="cuda"),
                              max_num_seqs=8)
        graphs.capture()
    finally:
        gc.set_threshold(*threshold)
    x.copy_(torch.randn_like(x))
    for size in graphs.sizes:
        expected = (x[:size] @ x[:size].T).sum(dim=1, keepdim=True) + 1
        torch.testing.assert_close(graphs.replay(size), expected, rtol=1e-3, atol=1e-3)
