"""Blocks that fell wholly out of the sliding window go back to the pool while the sequence runs, for models whose
every layer slides (Mistral with ``sliding_window``, StarCoder2); mixed local/global models keep every block."""

from __future__ import annotations

import pytest

from core.kv_cache import KVCacheManager, freeable_sliding_window
from ipc.config import SpeculativeConfig
from ipc.messages import EngineRequest, SamplingParams
from tests.core.engine_utils import make_engine
from tests.core.test_kv_cache import BS, make_seq
from tests.core.test_model_parity import check_against_hf, random_prompts
from tests.tiny_models import SLIDING_WINDOW, hf_greedy, make_tiny_model


def _decode(kv: KVCacheManager, seq, token: int = 7) -> None:
    """One decode step the way the scheduler runs it: slots for the last token, then it counts as computed."""
    assert kv.allocate_slots(seq, 1)
    seq.num_computed_tokens += 1
    seq.all_token_ids.append(token)


def test_blocks_behind_the_window_are_freed_with_exact_ids():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True, sliding_window=6)
    seq = make_seq(list(range(10)), "a")  # positions 0..9 in blocks 1, 2, 3
    assert kv.allocate_slots(seq, 10)
    seq.num_computed_tokens = 10
    seq.all_token_ids.append(99)
    assert kv.block_ids(seq) == [1, 2, 3]
    # the query at 10 sees 5..10: block 1 (0..3) is dead, block 2 (4..7) still holds 5..7
    _decode(kv, seq)
    assert kv.block_ids(seq) == [0, 2, 3] and kv.num_live_blocks(seq) == 2
    assert kv.pool.free_queue.block_ids()[-1] == 1  # back in the pool, keeping its prefix hash
    assert kv.pool.blocks[1].ref_cnt == 0 and kv.pool.blocks[1].block_hash is not None
    for _ in range(5):  # queries 11..15: the window starts at 10 at most, block 2 ends at 7 -> dead from query 12
        _decode(kv, seq)
    assert kv.block_ids(seq)[:2] == [0, 0] and kv.num_live_blocks(seq) == 2
    kv.free(seq)
    assert kv.num_free_blocks == 15  # nothing freed twice, nothing leaked


def test_dead_prefix_hits_are_not_taken():
    """A recomputed (preempted) sequence whose cached prefix is partly behind its window takes only the live part."""
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True, sliding_window=4)
    first = make_seq(list(range(17)), "a")
    assert kv.allocate_slots(first, 17)
    first.num_computed_tokens = 17
    kv.free(first)
    again = make_seq(list(range(17)), "b")
    hits = kv.find_cached_prefix(again)
    assert [b.block_id for b in hits] == [1, 2, 3, 4]  # 16 tokens cached in 4 blocks; 1 is left to compute
    assert kv.allocate_slots(again, 1, hits)
    # the query at 16 sees 13..16: the blocks of 0..11 are dead and never taken; 16 goes to a fresh block
    assert kv.block_ids(again) == [0, 0, 0, 4, 6] and kv.num_live_blocks(again) == 2
    assert [kv.pool.blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [0, 0, 0, 1]
    kv.free(again)
    assert kv.num_free_blocks == 15


def test_only_uniform_windows_free_blocks():
    assert freeable_sliding_window((4096,) * 32) == 4096  # Mistral, StarCoder2
    assert freeable_sliding_window((4096, 0) * 21) == 0  # Gemma 2: the global layers read everything
    assert freeable_sliding_window((1024,) * 5 + (0,)) == 0  # Gemma 3
    assert freeable_sliding_window(()) == 0
    assert freeable_sliding_window((4096,) * 32, shares_block_tables=True) == 0  # a draft model reads the tables


LONG = 150  # tokens generated: ~16x the blocks the window needs


VARIANTS = {
    "mistral_sw": ("mistral_sw", {}),
    "starcoder2": ("starcoder2", {}),
    "mistral_sw_chunked_prefill": ("mistral_sw", dict(max_num_batched_tokens=8)),
    "mistral_sw_async": ("mistral_sw", dict(async_scheduling=True)),
    "mistral_sw_ngram": ("mistral_sw", dict(speculative_config=SpeculativeConfig(
        method="ngram", num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1))),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_long_generation_keeps_block_count_bounded(tmp_path, variant):
    arch, options = VARIANTS[variant]
    path = make_tiny_model(tmp_path, arch, 0)
    prompts = random_prompts(5, lengths=(40, 9))
    engine = make_engine(path, block_size=4, **options)
    assert engine.kv.sliding_window == SLIDING_WINDOW
    params = SamplingParams(temperature=0.0, max_tokens=LONG, ignore_eos=True, logprobs=5)
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), prompt, params))
    results: dict = {}
    most_used = 0
    while engine.has_work():
        for out in engine.step().outputs:
            r = results.setdefault((int(out.request_id), out.index), {"tokens": [], "logprobs": []})
            r["tokens"].extend(out.new_token_ids)
            for ids, lps in zip(out.new_logprobs.token_ids, out.new_logprobs.logprobs):
                r["logprobs"].append(dict(zip(ids, lps)))
        decoding = len(results) == len(prompts) and all(len(r["tokens"]) > 1 for r in results.values())
        if decoding:  # (a prefill's first query sees from position 0 on: the whole prompt is held for it)
            most_used = max(most_used, engine.kv.pool.num_blocks - 1 - engine.kv.num_free_blocks)
    # per decoding sequence: the window's blocks, the one being written, one straddling the window's start (and
    # with speculation the verified drafts' blocks)
    bound = len(prompts) * (SLIDING_WINDOW // 4 + 2 + ("ngram" in variant))
    assert most_used <= bound
    full = sum(-(-(len(p) + LONG) // 4) for p in prompts)
    assert full > 4 * bound  # without freeing the sequences would have held this many
    check_against_hf(path, results, prompts, hf_greedy(path, prompts, LONG))
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1
    if "ngram" in variant:  # drafts were verified, some rejected (rolled back) and some accepted
        total = engine.spec_metrics.total
        assert 0 < total["accepted"] < total["draft_tokens"]


def test_mixed_local_global_model_keeps_its_blocks(tmp_path):
    path = make_tiny_model(tmp_path, "gemma2", 0)
    engine = make_engine(path, block_size=4)
    assert engine.kv.sliding_window == 0
