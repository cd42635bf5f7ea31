"""Scheduler without a model: chunk sizes, token budget, preemption order, forks, prefix-cache metrics."""

from __future__ import annotations

from core.kv_cache import KVCacheManager
from core.sequence import Sequence, SequenceStatus
from core.scheduler import Scheduler, SchedulerOutput
from ipc.messages import FinishReason, SamplingParams

BS = 4


def make(num_blocks=64, max_num_seqs=8, budget=32, caching=False) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, caching)
    return Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def new_seq(rid: str, n_prompt: int, max_tokens: int = 4, first: int = 0, **kw) -> Sequence:
    return Sequence(rid, list(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw),
                   max_model_len=256)


def fake_update(s: Scheduler, out: SchedulerOutput, token: int = 7) -> list[Sequence]:
    """What the engine does after the runner: sampled sequences get a token; finished ones leave."""
    finished = []
    for scheduled in out.scheduled:
        if scheduled.samples:
            seq = scheduled.seq
            if seq.append_token(token):
                s.finish(seq, seq.finish_reason)
                finished.append(seq)
    return finished


def chunks(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(x.seq.request_id, x.start, x.num_tokens) for x in out.scheduled]


def test_every_prompt_is_chunked_by_the_token_budget():
    s = make(budget=10)
    s.add_sequence(new_seq("a", 12))
    s.add_sequence(new_seq("b", 7))
    assert chunks(s.schedule()) == [("a", 0, 10)]
    out = s.schedule()
    assert chunks(out) == [("a", 10, 2), ("b", 0, 7)]
    assert out.total_num_tokens == 9


def test_running_requests_come_first_then_waiting_in_arrival_order():
    s = make(budget=20)
    s.add_sequence(new_seq("a", 5))
    fake_update(s, s.schedule())
    s.add_sequence(new_seq("b", 8))
    s.add_sequence(new_seq("c", 30))
    out = s.schedule()
    assert chunks(out) == [("a", 5, 1), ("b", 0, 8), ("c", 0, 11)]


def test_max_num_seqs_limits_running_requests():
    s = make(max_num_seqs=2)
    for r in "abc":
        s.add_sequence(new_seq(r, 3))
    assert [x.seq.request_id for x in s.schedule().scheduled] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_newest_running_request_is_preempted_and_requeued_first():
    s = make(num_blocks=5, budget=64)  # 4 allocatable blocks
    for r in "abc":
        s.add_sequence(new_seq(r, 4, max_tokens=8, first=10 * ord(r)))  # one full block each
    out = s.schedule()
    assert chunks(out) == [("a", 0, 4), ("b", 0, 4), ("c", 0, 4)]
    fake_update(s, out)
    # each needs a second block; a and b get the last free one and the one c frees
    out = s.schedule()
    assert [r.request_id for r in out.preempted] == ["c"]
    assert chunks(out) == [("a", 4, 1), ("b", 4, 1)]
    assert [r.request_id for r in s.waiting] == ["c"]
    c = s.waiting[0]
    assert c.num_computed_tokens == 0 and c.status is SequenceStatus.WAITING and c.output_token_ids == [7]
    assert s.stats().num_preemptions == 1


def test_request_that_cannot_grow_preempts_itself():
    s = make(num_blocks=3, budget=64)  # 2 allocatable blocks
    s.add_sequence(new_seq("a", 4, max_tokens=8, first=0))
    s.add_sequence(new_seq("b", 4, max_tokens=8, first=50))
    fake_update(s, s.schedule())
    out = s.schedule()  # a takes the last block for its 5th token; b, the newest, has nothing left
    assert chunks(out) == [("a", 4, 1)]
    assert [r.request_id for r in out.preempted] == ["b"]


def test_preempted_request_resumes_with_its_output_tokens_recomputed():
    s = make(num_blocks=4, budget=64)
    s.add_sequence(new_seq("a", 4, max_tokens=8, first=0))
    s.add_sequence(new_seq("b", 6, max_tokens=8, first=50))
    fake_update(s, s.schedule())
    out = s.schedule()
    assert [r.request_id for r in out.preempted] == ["b"]
    while not any(x.seq.request_id == "b" for x in out.scheduled):
        fake_update(s, out)
        out = s.schedule()
    b_chunk = [x for x in out.scheduled if x.seq.request_id == "b"][0]
    assert (b_chunk.start, b_chunk.num_tokens) == (0, 7)  # 6 prompt tokens + its 1 output token
    assert b_chunk.samples


def test_all_blocks_return_when_requests_finish():
    s = make(num_blocks=9, budget=16)
    for i in range(6):
        s.add_sequence(new_seq(str(i), 3 + 2 * i, max_tokens=5, first=100 * i))
    steps = 0
    while s.has_unfinished_sequences():
        fake_update(s, s.schedule())
        steps += 1
        assert steps < 200
    assert s.kv.num_free_blocks == 8
    assert all(b.ref_cnt == 0 for b in s.kv.pool.blocks)


def test_fork_shares_the_source_prompt_blocks():
    s = make(num_blocks=32, budget=64)
    params = SamplingParams(max_tokens=3, n=2)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    src = Sequence("r", prompt, params, index=0, max_model_len=256)
    child = Sequence("r", prompt, params, index=1, max_model_len=256, fork_source=src)
    s.add_sequence(src)
    s.add_sequence(child)
    out = s.schedule()
    assert chunks(out) == [("r", 0, 10), ("r", 8, 2)]
    assert s.kv.block_ids(child)[:2] == s.kv.block_ids(src)[:2]
    assert s.kv.block_ids(child)[2] != s.kv.block_ids(src)[2]
    assert [s.kv.pool.blocks[i].ref_cnt for i in s.kv.block_ids(src)] == [2, 2, 1]


def test_fork_waits_while_its_source_prefill_is_chunked():
    s = make(num_blocks=32, budget=6)
    params = SamplingParams(max_tokens=3, n=2)
    prompt = list(range(10))
    src = Sequence("r", prompt, params, index=0, max_model_len=256)
    child = Sequence("r", prompt, params, index=1, max_model_len=256, fork_source=src)
    s.add_sequence(src)
    s.add_sequence(child)
    assert chunks(s.schedule()) == [("r", 0, 6)]
    assert chunks(s.schedule()) == [("r", 6, 4), ("r", 8, 2)]


def test_prefix_cache_metrics_count_query_and_hit_tokens():
    s = make(num_blocks=16, budget=64, caching=True)
    s.add_sequence(new_seq("a", 8, max_tokens=8, first=0))
    s.add_sequence(new_seq("b", 4, max_tokens=8, first=100))
    fake_update(s, s.schedule())
    stats = s.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (12, 0)
    s.add_sequence(new_seq("c", 9, max_tokens=2, first=0))  # shares a's two full prompt blocks
    out = s.schedule()
    assert ("c", 8, 1) in chunks(out)
    stats = s.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (9, 8)


def test_recompute_after_preemption_is_not_counted_as_a_hit():
    s = make(num_blocks=5, budget=64, caching=True)  # 4 allocatable blocks
    s.add_sequence(new_seq("a", 8, max_tokens=2, first=0))
    s.add_sequence(new_seq("b", 4, max_tokens=8, first=100))
    fake_update(s, s.schedule())
    s.stats()
    out = s.schedule()  # a needs a third block: b is preempted, its full block stays cached
    assert [r.request_id for r in out.preempted] == ["b"]
    while not any(x.seq.request_id == "b" for x in out.scheduled):
        fake_update(s, out)
        out = s.schedule()
    b = [x for x in out.scheduled if x.seq.request_id == "b"][0]
    assert b.start == 4  # the recompute did reuse b's cached block...
    stats = s.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (0, 0)  # ...but it is no cache hit


def test_finish_frees_blocks_and_records_reason():
    s = make()
    r = new_seq("a", 5)
    s.add_sequence(r)
    s.schedule()
    s.finish(r, FinishReason.ABORT)
    assert r.finish_reason is FinishReason.ABORT and r.is_finished
    assert s.kv.num_free_blocks == 63 and not s.has_unfinished_sequences()
