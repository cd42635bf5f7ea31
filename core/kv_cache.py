"""Paged KV memory bookkeeping: a pool of fixed-size blocks, per-sequence block tables and prefix caching.

Pure Python, no torch: the tensors live in the model runner; this module only decides which block ids a
sequence's tokens go to. Block 0 is the reserved null block (it pads block tables and is never handed out).

Prefix caching: every *full* block is named by a hash chained from its parent's hash, its token ids and the
request's ``cache_salt``. A hash -> block map finds the longest cached prefix of a new sequence; hits are shared by
raising their ref count. Freed blocks keep their hash and go to the tail of an LRU free queue; a block is evicted
(its hash dropped) only when it is popped to hold new content.

Sliding window (models whose every layer sees only the last W positions: Mistral with ``sliding_window``,
StarCoder2, Phi-3): before each allocation, the leading blocks that no query of the step or later can see are freed
like any other block and their table entries become the null block, so a long generation holds about W / block_size
+ 2 blocks, not its whole length. Mixed local/global models (Gemma 2/3, Qwen2 with ``max_window_layers``) keep every
block: their global layers read all positions with the same block table.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import abc
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.sequence import Sequence


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks: O(1) pop from the head, append at the tail and removal from the middle
    (a prefix-cache hit on a free block takes it out of the queue)."""

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail or block is None:
            raise IndexError("no free block")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"{block} is not in the free queue"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def block_ids(self) -> list[int]:
        """Head-to-tail order (the eviction order); for tests and debugging."""
        ids, block = [], self._head.next_free
        while block is not None and block is not self._tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(f"The KV cache needs at least 2 blocks (one is reserved), got {num_blocks}.")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached: dict[bytes, KVBlock] = {}
        self.num_allocated = 0  # blocks handed out for new content, ever (prefix hits are not allocations)

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        """Fraction of allocatable blocks held by sequences (free cached blocks count as free)."""
        return 1.0 - self.free_queue.num_free / (self.num_blocks - 1)

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        if n > self.free_queue.num_free:
            raise ValueError(f"asked for {n} blocks, {self.free_queue.num_free} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            if block.block_hash is not None:  # lazy eviction: the content is overwritten now
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        self.num_allocated += n
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Share blocks (prefix hits, forks): a free one leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks_in_eviction_order: Iterable[KVBlock]) -> None:
        for block in blocks_in_eviction_order:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"double free of {block}"
            if block.ref_cnt == 0:
                if not self.enable_caching:
                    block.block_hash = None
                self.free_queue.append(block)

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self.cached.get(block_hash)

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        if block.block_hash is not None:
            return
        if block_hash not in self.cached:  # an identical block computed concurrently stays uncached
            self.cached[block_hash] = block
            block.block_hash = block_hash

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use, as vLLM does."""
        if self.free_queue.num_free != self.num_blocks - 1:
            return False
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()
        return True


def hash_block(parent_hash: bytes | None, token_ids: abc.Sequence[int], cache_salt: str | None) -> bytes:
    """sha256 of (parent, tokens, salt): collisions can't be crafted to read another tenant's cache."""
    h = hashlib.sha256(parent_hash or b"\0" * 32)
    h.update(array("q", token_ids).tobytes())
    if cache_salt is not None and parent_hash is None:
        h.update(b"salt:" + cache_salt.encode())
    return h.digest()


class KVCacheManager:
    """Block tables of running sequences, allocation for the tokens a step schedules, and prefix-cache lookup."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, sliding_window: int = 0) -> None:
        """``sliding_window`` W > 0: every layer of the model sees only the last W positions, so blocks that fell
        wholly out of the window are freed while the sequence runs (their table entries become ``null_block``)."""
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks, enable_caching)
        self.null_block = self.pool.blocks[0]  # the reserved block: never allocated, never freed
        self.seq_blocks: dict[tuple[str, int], list[KVBlock]] = {}
        self._num_cached: dict[tuple[str, int], int] = {}  # how many leading blocks are registered in the cache
        self._num_dropped: dict[tuple[str, int], int] = {}  # leading blocks freed as out of the window

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_ids(self, seq: "Sequence") -> list[int]:
        return [b.block_id for b in self.seq_blocks.get(seq.key, ())]

    def blocks(self, seq: "Sequence") -> list[KVBlock]:
        return self.seq_blocks.get(seq.key, [])

    def _update_block_hashes(self, seq: "Sequence", num_tokens: int) -> None:
        bs = self.block_size
        hashes = seq.block_hashes
        tokens = seq.all_token_ids  # a token still being sampled (async step in flight) is not hashed yet
        for i in range(len(hashes), min(num_tokens, len(tokens)) // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs],
                                     seq.cache_salt))

    def find_cached_prefix(self, seq: "Sequence") -> list[KVBlock]:
        """The longest run of cached blocks at the start of the sequence, leaving at least its last token to
        compute (its logits are needed)."""
        if not self.enable_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._update_block_hashes(seq, max_blocks * self.block_size)
        hits = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(
        self, seq: "Sequence", num_new_tokens: int, new_computed_blocks: abc.Sequence[KVBlock] = ()
    ) -> bool:
        """Make room for ``num_new_tokens`` after the computed ones (and the shared ``new_computed_blocks``, which
        the caller counts as computed). False, with nothing changed, when the pool is short (blocks that fell out
        of the sliding window are freed either way: no query can read them any more; shared ones never taken)."""
        blocks = self.seq_blocks.setdefault(seq.key, [])
        num_computed = seq.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_needed = -(-total // self.block_size) - len(blocks) - len(new_computed_blocks)
        num_dead_shared = 0
        if self.sliding_window:  # this step's first query is at num_computed: what is before its window is dead
            num_dead = self.num_out_of_window_blocks(num_computed)
            self._drop_blocks(seq, blocks, min(num_dead, len(blocks)))
            num_dead_shared = min(max(num_dead - len(blocks), 0), len(new_computed_blocks))
            new_computed_blocks = new_computed_blocks[num_dead_shared:]  # never taken: nothing will read them
        # Shared blocks that sit in the free queue (cached, ref 0) stop being free once we take them.
        num_leaving_free = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_leaving_free:
            if not blocks:
                del self.seq_blocks[seq.key]
                self._num_dropped.pop(seq.key, None)
            return False
        if num_dead_shared:
            blocks.extend([self.null_block] * num_dead_shared)
            self._num_dropped[seq.key] = len(blocks)
        if new_computed_blocks or num_dead_shared:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            # Shared blocks are cached already (or belong to a fork source that registers them itself).
            self._num_cached[seq.key] = len(blocks)
        if num_needed > 0:
            blocks.extend(self.pool.get_new_blocks(num_needed))
        if self.enable_caching:
            self._cache_full_blocks(seq, total)
        return True

    def _cache_full_blocks(self, seq: "Sequence", num_tokens: int) -> None:
        """Register the blocks that the scheduled tokens fill: a later sequence in the same step may share them,
        since every layer writes the step's new KV before any attention reads it."""
        num_full = min(num_tokens, len(seq.all_token_ids)) // self.block_size
        start = self._num_cached.get(seq.key, 0)
        if num_full <= start:
            return
        self._update_block_hashes(seq, num_full * self.block_size)
        blocks = self.seq_blocks[seq.key]
        for i in range(start, num_full):
            if blocks[i] is not self.null_block:
                self.pool.cache_block(blocks[i], seq.block_hashes[i])
        self._num_cached[seq.key] = num_full

    def reserve(self, seq: "Sequence", num_new_tokens: int) -> bool:
        """Room for ``num_new_tokens`` after the computed ones, without registering any block in the prefix cache
        (a draft model writes those slots before the target does). False, with nothing changed, when short."""
        blocks = self.seq_blocks.setdefault(seq.key, [])
        num_needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - len(blocks)
        if num_needed > self.pool.num_free_blocks:
            return False
        if num_needed > 0:
            blocks.extend(self.pool.get_new_blocks(num_needed))
        return True

    def trim(self, seq: "Sequence", num_tokens: int) -> None:
        """Keep only the blocks that ``num_tokens`` tokens need (speculative decoding: rejected drafts' slots go
        back, tail first). The freed blocks held only draft positions, so none of them is in the prefix cache."""
        blocks = self.seq_blocks.get(seq.key)
        if not blocks:
            return
        keep = -(-num_tokens // self.block_size)
        assert keep >= self._num_dropped.get(seq.key, 0), "a rollback below the sliding window's freed blocks"
        if keep < len(blocks):
            tail = blocks[keep:]
            del blocks[keep:]
            self._num_cached[seq.key] = min(self._num_cached.get(seq.key, 0), keep)
            self.pool.free_blocks(reversed(tail))

    def free(self, seq: "Sequence") -> None:
        """Return a sequence's blocks, tail first, so a chain's tail is evicted before its head."""
        blocks = self.seq_blocks.pop(seq.key, None)
        self._num_cached.pop(seq.key, None)
        num_dropped = self._num_dropped.pop(seq.key, 0)
        if blocks:
            self.pool.free_blocks(reversed(blocks[num_dropped:]))

    def num_out_of_window_blocks(self, first_query_position: int) -> int:
        """Leading blocks no query at ``first_query_position`` or later can see: the window of a query at p starts
        at p - W + 1 (HF's ``kv_idx > q_idx - W``), so a block ending before that is never read again."""
        if not self.sliding_window:
            return 0
        return max(first_query_position - self.sliding_window + 1, 0) // self.block_size

    def num_live_blocks(self, seq: "Sequence") -> int:
        """Blocks the sequence holds (its table's length less the ones freed as out of the window)."""
        return len(self.seq_blocks.get(seq.key, ())) - self._num_dropped.get(seq.key, 0)

    def _drop_blocks(self, seq: "Sequence", blocks: list[KVBlock], num_dead: int) -> None:
        """Free the sequence's first ``num_dead`` blocks (those not freed yet), tail first like ``free``; their table
        entries become ``null_block``. A full block keeps its hash in the free queue like any freed block: its
        content is still right for its prefix until the block is reused. The runner keeps the old ids in its
        table; the attention kernels never read positions outside a window, so the ids are never followed."""
        start = self._num_dropped.get(seq.key, 0)
        if num_dead <= start:
            return
        dead = blocks[start:num_dead]
        blocks[start:num_dead] = [self.null_block] * len(dead)
        self._num_dropped[seq.key] = num_dead
        self.pool.free_blocks(reversed(dead))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()


def freeable_sliding_window(sliding_windows: tuple[int, ...], shares_block_tables: bool = False) -> int:
    """The window to free blocks by: W when every layer slides by the same W (Mistral with ``sliding_window``,
    StarCoder2, Phi-3). 0 for mixed local/global models (Gemma 2/3, Qwen2's ``max_window_layers``): their global
    layers read every position, so a block is never dead while its sequence runs; and 0 when another model (a draft
    model) reads the same block tables."""
    if shares_block_tables or not sliding_windows or len(set(sliding_windows)) != 1:
        return 0
    return max(sliding_windows[0], 0)
