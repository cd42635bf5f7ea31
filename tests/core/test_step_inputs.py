"""StepInputs' double-buffered host staging: a host buffer is rewritten only after the copies last enqueued from it
have run (a non-blocking copy reads pinned memory when the device executes it)."""

from __future__ import annotations

import numpy as np
import torch

from core.step_inputs import StepInputs, _HostStaging


class _FakeEvent:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def synchronize(self) -> None:
        self.log.append(self.name)


def test_stage_waits_for_the_copies_of_the_buffer_it_rewrites():
    inputs = StepInputs(64, 4, 8, 16, torch.device("cpu"))
    inputs._hosts.append(_HostStaging(64, 4, 8, pin=False))  # two turns, as on CUDA
    inputs._copied = [None, None]
    log: list[str] = []
    table = np.arange(8, dtype=np.int32).reshape(1, 8)

    def stage():
        return inputs.stage(np.array([5, 6, 7]), np.array([0]), np.array([3]), table)

    stage()  # turn 1: nothing copied from it yet
    assert log == []
    inputs._copied = [_FakeEvent(log, "buffer 0"), _FakeEvent(log, "buffer 1")]
    stage()  # turn 0 again: its previous copies must have run first
    assert log == ["buffer 0"]
    meta = stage()
    assert log == ["buffer 0", "buffer 1"]
    assert inputs.input_ids[:3].tolist() == [5, 6, 7] and meta.slot_mapping.tolist() == [0, 1, 2]
