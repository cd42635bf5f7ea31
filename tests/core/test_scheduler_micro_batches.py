"""The scheduler under pipeline parallelism (``micro_batches`` > 0), without a model: a micro-batch never takes a
sequence that has a step in flight, and the live sequences split into equal groups that are in flight together."""

from __future__ import annotations

import pytest

from core.scheduler import SchedulerOutput
from ipc.messages import EngineConfig
from tests.core.test_scheduler import fake_update, make, new_seq


def start(out: SchedulerOutput) -> set[str]:
    """What the engine does when it starts a micro-batch: its sequences are in flight."""
    for scheduled in out.scheduled:
        scheduled.seq.in_flight = True
    return {s.seq.request_id for s in out.scheduled}


def finish(s, out: SchedulerOutput) -> None:
    """... and when the micro-batch's results are in."""
    for scheduled in out.scheduled:
        scheduled.seq.in_flight = False
    fake_update(s, out)


def test_eight_running_requests_flow_as_two_disjoint_micro_batches():
    s = make(max_num_seqs=8, budget=64)
    s.micro_batches = 2
    for i in range(8):
        s.add_sequence(new_seq(f"r{i}", 5, max_tokens=20, first=10 * i))
    a = s.schedule()
    in_a = start(a)
    b = s.schedule()
    in_b = start(b)
    assert len(in_a) == len(in_b) == 4 and not in_a & in_b  # both in flight at once, no request in both
    assert s.schedule().is_empty  # every request has a step in flight: nothing to start
    for _ in range(5):  # steady state: the oldest comes back, its group goes again; never the other group
        finish(s, a)
        c = s.schedule()
        assert start(c) == in_a
        a, b, in_a, in_b = b, c, in_b, in_a
        assert all(x.num_tokens == 1 for x in c.scheduled)  # decodes: their last token is known


def test_a_sequence_preempted_while_in_flight_waits_for_its_token():
    """A tiny KV budget: a later micro-batch preempts a sequence whose step is in flight; it is recomputed only
    after that step's token is in (the token the step samples is part of what it recomputes)."""
    s = make(num_blocks=7, max_num_seqs=4, budget=64)
    s.micro_batches = 2
    for i in range(4):
        s.add_sequence(new_seq(f"r{i}", 4, max_tokens=12, first=10 * i))
    a = s.schedule()
    start(a)
    b = s.schedule()
    start(b)
    finish(s, a)
    victims = []
    for _ in range(10):
        c = s.schedule()
        victims = [v for v in c.preempted if v.in_flight]
        start(c)
        if victims:
            break
        finish(s, b)
        b = c
    assert victims, "expected a preemption of a sequence in flight"
    victim = victims[0]  # in micro-batch b, still in flight
    assert victim.status.name == "WAITING"
    assert all(x.seq is not victim for x in s.schedule().scheduled)  # not recomputed while its step is in flight
    num_tokens = victim.num_tokens
    finish(s, b)  # its token arrives
    assert victim.num_tokens == num_tokens + 1 and not victim.in_flight


def test_micro_batches_off_schedules_everything_in_one_step():
    s = make(max_num_seqs=8, budget=64)
    for i in range(8):
        s.add_sequence(new_seq(f"r{i}", 5, first=10 * i))
    assert len(s.schedule().scheduled) == 8


def test_pipeline_micro_batches_needs_pipeline_parallelism():
    from core.engine import EngineCore

    with pytest.raises(ValueError, match="pipeline_micro_batches=2 needs pipeline parallelism"):
        EngineCore(EngineConfig(model="m", pipeline_micro_batches=2))  # before anything is loaded
    with pytest.raises(ValueError, match="pipeline_micro_batches must be >= 1"):
        EngineConfig(model="m", pipeline_parallel_size=2, pipeline_micro_batches=0)
    assert EngineConfig(model="m", pipeline_parallel_size=2, pipeline_micro_batches=1).pipeline_micro_batches == 1
