"""The scheduler -> runner contract: the message round-trips through msgpack, and a runner's persistent batch,
kept only from the messages, equals the engine's view after random adds, appends, preemptions, rollbacks and
finishes."""

from __future__ import annotations

import random

from core.kv_cache import KVCacheManager
from core.scheduler import Scheduler
from core.scheduler_output_builder import SchedulerOutputBuilder
from core.sequence import Sequence
from core.worker_batch import WorkerBatch
from ipc.messages import FinishReason, SamplingParams
from ipc.scheduler_output import (
    BlockTableChange, NewSequenceData, SchedulerOutput, decode_scheduler_output, encode_scheduler_output,
)

BS = 4


def test_scheduler_output_round_trips():
    out = SchedulerOutput(
        slots=[0, 3], starts=[0, 9], num_tokens=[5, 3], samples=[True, True], output_indices=[0, 4],
        spec_token_ids=[[], [5, 6]],
        new_sequences=[NewSequenceData(request_id="a", index=0, slot=0, prompt_token_ids=[1, 2, 3, 4, 5],
                                       output_token_ids=[], sampling_params=SamplingParams(
                                           temperature=0.5, seed=3, max_tokens=7, stop_token_ids=[9]),
                                       block_ids=[3, 4], prompt_logprobs_done=False)],
        appended_slots=[3], appended_counts=[2], appended_token_ids=[8, 9],
        block_changes=[BlockTableChange(3, 2, [11])],
        finished_slots=[1, 2],
        total_num_tokens=8,
    )
    data = encode_scheduler_output(out)
    assert decode_scheduler_output(data) == out
    # A decode step of 256 known sequences: flat columns of small ints, a few bytes per sequence.
    n = 256
    decode = SchedulerOutput(slots=list(range(n)), starts=[100] * n, num_tokens=[1] * n, samples=[True] * n,
                             output_indices=[30] * n, appended_slots=list(range(n)), appended_token_ids=[17] * n,
                             total_num_tokens=n)
    assert decode_scheduler_output(encode_scheduler_output(decode)) == decode
    assert len(encode_scheduler_output(decode)) < 10 * n  # one struct per row took ~23 bytes a row


def test_worker_batch_follows_the_engine_through_random_steps():
    rng = random.Random(0)
    kv = KVCacheManager(40, BS, True)
    scheduler = Scheduler(kv, max_num_seqs=6, max_num_batched_tokens=24)
    builder = SchedulerOutputBuilder()
    batch = WorkerBatch(6, 64, frozenset({0}))
    live: dict[tuple[str, int], Sequence] = {}
    checked = preempted = rolled_back = multi_token = 0
    for step in range(300):
        if rng.random() < 0.4:
            rid = f"r{step}"
            prompt = [rng.randrange(1, 50) for _ in range(rng.randrange(1, 30))]
            params = SamplingParams(max_tokens=rng.randrange(1, 40), seed=rng.choice([None, step]), ignore_eos=True)
            seq = Sequence(rid, prompt, params, max_model_len=200, eos_token_ids=frozenset({0}))
            scheduler.add_sequence(seq)
            live[seq.key] = seq
        if live and rng.random() < 0.05:  # an abort
            victim = rng.choice(list(live.values()))
            scheduler.finish(victim, FinishReason.ABORT)
            del live[victim.key]
        sched = scheduler.schedule()
        preempted += len(sched.preempted)
        builder.forget(sched.freed_keys)
        if not sched.scheduled:
            continue
        message = decode_scheduler_output(encode_scheduler_output(builder.build(sched, kv.seq_blocks)))
        got = batch.apply(message)
        multi_token += bool(message.appended_counts)
        # Every scheduled sequence: the same tokens, block ids and parameters on both sides.
        for s, b in zip(sched.scheduled, got):
            seq = s.seq
            assert b.key == seq.key
            assert b.all_token_ids == seq.all_token_ids
            assert b.block_ids == kv.block_ids(seq)
            assert b.sampling_params == seq.sampling_params and b.seed_key == seq.seed_key
        for slot, b in zip(message.slots, got):
            assert list(batch.block_table[slot, : len(b.block_ids)]) == b.block_ids
            checked += 1
        # Nothing the engine freed lingers in the runner's batch.
        assert set(batch.sequences) <= {k for k in live} | set(builder._sent)
        for s in sched.scheduled:  # the runner's output: a sampled token each; some sequences give blocks back
            if not s.samples:
                continue
            seq = s.seq
            # Sometimes two tokens (an accepted draft, then the sampled one): the runner gets both in one message.
            two = rng.random() < 0.15
            if seq.append_token(rng.randrange(1, 50)) or (two and seq.append_token(rng.randrange(1, 50))):
                scheduler.finish(seq, seq.finish_reason)
                del live[seq.key]
            elif rng.random() < 0.2:  # a draft model reserves slots for drafts (the runner sees them next step)
                kv.reserve(seq, 1 + BS * 2)
            elif rng.random() < 0.3:  # verification rejected drafts: their blocks go back
                before = len(kv.blocks(seq))
                kv.trim(seq, seq.num_computed_tokens)
                builder.trim_blocks(seq.key, len(kv.blocks(seq)))
                rolled_back += len(kv.blocks(seq)) < before
    assert checked > 300 and preempted > 0 and rolled_back > 0 and multi_token > 0, (
        checked, preempted, rolled_back, multi_token)
