"""Block pool, free queue and prefix caching, without a model: exact block ids, ref counts, eviction order."""

from __future__ import annotations

import pytest

from core.kv_cache import FreeBlockQueue, KVBlock, KVCacheManager, hash_block
from core.sequence import Sequence
from ipc.messages import SamplingParams

BS = 4


def make_seq(tokens: list[int], rid: str = "r", salt: str | None = None) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=8), max_model_len=1024, cache_salt=salt)


def schedule_all(kv: KVCacheManager, seq: Sequence) -> list[int]:
    """Allocate like the scheduler does for a fresh sequence: prefix hits first, then the rest of its tokens."""
    hits = kv.find_cached_prefix(seq)
    assert kv.allocate_slots(seq, seq.num_tokens - len(hits) * BS, hits)
    seq.num_computed_tokens = seq.num_tokens
    return kv.block_ids(seq)


def test_free_queue_pops_head_and_removes_from_middle():
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert q.popleft() is blocks[0]
    q.append(blocks[0])
    assert q.block_ids() == [1, 3, 4, 0]
    assert q.num_free == 4


def test_allocation_gives_lowest_free_ids_and_reserves_null_block():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_caching=False)
    a = make_seq(list(range(10)), "a")  # 10 tokens -> 3 blocks
    assert kv.allocate_slots(a, 10)
    assert kv.block_ids(a) == [1, 2, 3]
    b = make_seq(list(range(5)), "b")
    assert kv.allocate_slots(b, 5)
    assert kv.block_ids(b) == [4, 5]
    assert kv.num_free_blocks == 2


def test_allocation_fails_without_side_effects_when_short():
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_caching=False)
    a = make_seq(list(range(20)), "a")
    assert not kv.allocate_slots(a, 20)  # needs 5 blocks, 3 allocatable
    assert kv.num_free_blocks == 3 and kv.block_ids(a) == []


def test_decode_grows_block_table_only_at_block_boundary():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_caching=False)
    a = make_seq([1, 2, 3], "a")
    assert kv.allocate_slots(a, 3)
    a.num_computed_tokens = 3
    a.all_token_ids.append(9)
    assert kv.allocate_slots(a, 1) and kv.block_ids(a) == [1]
    a.num_computed_tokens = 4
    a.all_token_ids.append(9)
    assert kv.allocate_slots(a, 1) and kv.block_ids(a) == [1, 2]


def test_free_returns_blocks_tail_first():
    kv = KVCacheManager(num_blocks=5, block_size=BS, enable_caching=False)
    a = make_seq(list(range(12)), "a")
    kv.allocate_slots(a, 12)
    kv.free(a)
    assert kv.pool.free_queue.block_ids() == [4, 3, 2, 1]
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_hash_chain_depends_on_parent_tokens_and_salt():
    h1 = hash_block(None, [1, 2, 3, 4], None)
    assert hash_block(h1, [5, 6, 7, 8], None) != hash_block(hash_block(None, [0, 2, 3, 4], None), [5, 6, 7, 8], None)
    assert hash_block(None, [1, 2, 3, 4], "tenant-a") != h1
    assert hash_block(None, [1, 2, 3, 4], None) == h1


def test_prefix_hit_shares_blocks_and_raises_ref_counts():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True)
    prefix = list(range(100, 112))  # 3 full blocks
    a = make_seq(prefix + [1, 2], "a")
    ids_a = schedule_all(kv, a)
    assert ids_a == [1, 2, 3, 4]
    b = make_seq(prefix + [7, 8, 9], "b")
    ids_b = schedule_all(kv, b)
    assert ids_b[:3] == [1, 2, 3] and ids_b[3:] == [5]
    assert [kv.pool.blocks[i].ref_cnt for i in (1, 2, 3, 4, 5)] == [2, 2, 2, 1, 1]


def test_last_prompt_token_is_always_computed():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True)
    tokens = list(range(8))  # exactly 2 full blocks
    schedule_all(kv, make_seq(tokens, "a"))
    hits = kv.find_cached_prefix(make_seq(tokens, "b"))
    assert len(hits) == 1  # the second block holds the last token, which must be recomputed


def test_freed_blocks_stay_cached_until_reused_then_evicted_lazily():
    kv = KVCacheManager(num_blocks=6, block_size=BS, enable_caching=True)
    a = make_seq(list(range(8)) + [50], "a")  # blocks 1,2 full (cached), 3 partial
    schedule_all(kv, a)
    kv.free(a)
    assert kv.pool.free_queue.block_ids() == [4, 5, 3, 2, 1]  # tail of the chain first
    assert len(kv.pool.cached) == 2
    b = make_seq(list(range(8)) + [60], "b")
    assert [blk.block_id for blk in kv.find_cached_prefix(b)] == [1, 2]
    # A request with other content takes the free blocks in LRU order; reusing block 2 evicts its hash.
    old_hash_of_2 = kv.pool.blocks[2].block_hash
    c = make_seq(list(range(200, 216)), "c")
    assert kv.allocate_slots(c, 16)
    assert kv.block_ids(c) == [4, 5, 3, 2]
    # Block 2 (the chain's tail) was evicted; block 1 (its head) went last and is still a hit.
    assert [blk.block_id for blk in kv.find_cached_prefix(b)] == [1]
    assert kv.pool.lookup(old_hash_of_2) is None


def test_hit_on_free_cached_block_removes_it_from_free_queue():
    kv = KVCacheManager(num_blocks=6, block_size=BS, enable_caching=True)
    a = make_seq(list(range(8)) + [1], "a")
    schedule_all(kv, a)
    kv.free(a)
    b = make_seq(list(range(8)) + [2], "b")
    ids = schedule_all(kv, b)
    assert ids[:2] == [1, 2]
    assert 1 not in kv.pool.free_queue.block_ids() and 2 not in kv.pool.free_queue.block_ids()
    assert kv.num_free_blocks == 2  # of 5: two shared, one new for b's tail


def test_cache_salt_isolates_tenants():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True)
    tokens = list(range(12)) + [1]
    schedule_all(kv, make_seq(tokens, "a", salt="tenant-a"))
    assert kv.find_cached_prefix(make_seq(tokens, "b", salt="tenant-b")) == []
    assert kv.find_cached_prefix(make_seq(tokens, "c")) == []
    assert len(kv.find_cached_prefix(make_seq(tokens, "d", salt="tenant-a"))) == 3


def test_caching_disabled_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=False)
    schedule_all(kv, make_seq(list(range(13)), "a"))
    assert kv.find_cached_prefix(make_seq(list(range(13)), "b")) == []


def test_reset_prefix_cache_refused_while_blocks_in_use():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_caching=True)
    a = make_seq(list(range(9)), "a")
    schedule_all(kv, a)
    assert not kv.reset_prefix_cache()
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.find_cached_prefix(make_seq(list(range(9)), "b")) == []


def test_double_free_is_caught():
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_caching=False)
    a = make_seq([1, 2], "a")
    kv.allocate_slots(a, 2)
    blocks = kv.blocks(a)
    kv.free(a)
    with pytest.raises(AssertionError):
        kv.pool.free_blocks(blocks)


def test_reserve_adds_blocks_without_caching_them():
    """A draft model's look-ahead slots: blocks for the positions after the computed ones, none of them registered
    in the prefix cache (the target has not written them yet), nothing taken when the pool is short."""
    kv = KVCacheManager(num_blocks=4, block_size=4)
    seq = make_seq(list(range(8)))  # two full blocks of known tokens
    seq.num_computed_tokens = 7  # the last token is still to compute
    assert kv.reserve(seq, 4)  # positions 7..10: blocks for 11 tokens
    assert kv.block_ids(seq) == [1, 2, 3] and kv.pool.cached == {}
    assert kv.reserve(seq, 2) and kv.block_ids(seq) == [1, 2, 3]  # already there
    assert not kv.reserve(seq, 6) and kv.block_ids(seq) == [1, 2, 3]
