"""The simulated KV cache against hand-computed cases (block size 2 keeps them small)."""

from __future__ import annotations

import hashlib
import struct

import pytest

from kvrouter.sim.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvrouter.sim.kvcache import BlockTable, CacheFullError, KVCache, chain_hashes, token_bytes

BS = 2
ROOT = b"\x00" * 32


def hashes_of(tokens: list[int]) -> list[int]:
    return chain_hashes(ROOT, token_bytes(tokens), BS)[0]


def store(cache: KVCache, tokens: list[int]) -> BlockTable:
    """Run a sequence through the cache as the scheduler does: hit, allocate, register."""
    hs = hashes_of(tokens)
    hit = cache.match_prefix(hs, len(tokens))
    table = BlockTable()
    cache.allocate(table, hit, -(-len(tokens) // BS) - len(hit))
    cache.register(table, hs, tokens, len(tokens) // BS)
    return table


def test_chain_hash_is_sha256_of_parent_and_uint32_le_tokens_low_64_bits_big_endian() -> None:
    d1 = hashlib.sha256(ROOT + struct.pack("<2I", 1, 2)).digest()
    d2 = hashlib.sha256(d1 + struct.pack("<2I", 3, 4)).digest()
    hs, last = chain_hashes(ROOT, token_bytes([1, 2, 3, 4, 5]), BS)
    assert hs == [int.from_bytes(d1[-8:], "big"), int.from_bytes(d2[-8:], "big")]
    assert last == d2  # the partial block [5] is not hashed


def test_only_full_blocks_are_cached_and_stored_event_carries_the_run() -> None:
    cache = KVCache(8, BS)
    table = store(cache, [1, 2, 3, 4, 5])
    hs = hashes_of([1, 2, 3, 4])
    assert cache.cached_hashes() == set(hs)
    assert cache.take_events() == [BlockStored(hs, None, [1, 2, 3, 4], BS)]
    assert len(table.block_ids) == 3  # 2 full + 1 partial, all held
    assert cache.num_free == 5


def test_hit_is_capped_so_one_token_is_computed() -> None:
    cache = KVCache(8, BS)
    cache.free(store(cache, [1, 2, 3, 4]))
    hs = hashes_of([1, 2, 3, 4])
    # 4 tokens: at most 3 may hit -> 1 whole block.
    assert len(cache.match_prefix(hs, 4)) == 1
    # 5 tokens sharing both blocks: 4 may hit -> 2 blocks.
    assert len(cache.match_prefix(hashes_of([1, 2, 3, 4, 9]), 5)) == 2
    # A different first block hits nothing even if the second matched by value.
    assert cache.match_prefix(hashes_of([7, 7, 3, 4, 9]), 5) == []


def test_lru_eviction_order_among_free_blocks_and_tail_first() -> None:
    cache = KVCache(4, BS)
    a = store(cache, [1, 2, 3, 4])  # blocks A0 A1
    b = store(cache, [5, 6, 7, 8])  # blocks B0 B1
    ha, hb = hashes_of([1, 2, 3, 4]), hashes_of([5, 6, 7, 8])
    cache.free(a)
    cache.free(b)
    # Freed tail first: A1, A0, then B1, B0; the front is evicted first.
    assert cache.eviction_order() == [ha[1], ha[0], hb[1], hb[0]]
    cache.take_events()
    c = store(cache, [9, 9, 9, 9, 9, 9])  # needs 3 blocks -> evicts A1, A0, B1
    events = cache.take_events()
    removed = [e.block_hashes[0] for e in events if isinstance(e, BlockRemoved)]
    assert removed == [ha[1], ha[0], hb[1]]
    assert cache.cached_hashes() == {hb[0], *hashes_of([9, 9, 9, 9, 9, 9])}
    # The head survived the tail: the prefix property holds.
    assert len(cache.match_prefix(hb, 5)) == 1
    cache.free(c)


def test_a_hit_refreshes_recency() -> None:
    cache = KVCache(4, BS)
    cache.free(store(cache, [1, 2]))  # A
    cache.free(store(cache, [3, 4]))  # B
    ha, hb = hashes_of([1, 2]), hashes_of([3, 4])
    cache.free(store(cache, [1, 2, 5]))  # hits A, so A becomes newer than B
    order = cache.eviction_order()
    assert order.index(hb[0]) < order.index(ha[0])


def test_blocks_of_running_requests_are_never_evicted() -> None:
    cache = KVCache(3, BS)
    running = store(cache, [1, 2, 3, 4])  # holds 2 blocks
    assert cache.num_free == 1
    assert not cache.can_allocate([], 2)
    with pytest.raises(CacheFullError):
        cache.allocate(BlockTable(), [], 2)
    assert cache.cached_hashes() == set(hashes_of([1, 2, 3, 4]))  # nothing evicted
    # A hit on a held block pins it once more without using a free block.
    hs = hashes_of([1, 2, 3, 4, 5])
    hit = cache.match_prefix(hs, 5)
    assert cache.can_allocate(hit, 1)
    other = BlockTable()
    cache.allocate(other, hit, 1)
    cache.free(running)
    assert cache.num_free == 0  # still held by `other`
    cache.free(other)
    assert cache.num_free == 3


def test_hitting_a_free_cached_block_takes_it_out_of_the_free_pool() -> None:
    cache = KVCache(2, BS)
    cache.free(store(cache, [1, 2, 3, 4]))
    hs = hashes_of([1, 2, 3, 4, 5])
    hit = cache.match_prefix(hs, 5)
    assert len(hit) == 2
    assert cache.can_allocate(hit, 0)
    assert not cache.can_allocate(hit, 1)  # both free blocks are the hit ones


def test_concurrent_duplicates_are_not_deduplicated() -> None:
    cache = KVCache(4, BS)
    tokens = [1, 2, 3]
    hs = hashes_of(tokens)
    t1, t2 = BlockTable(), BlockTable()
    cache.allocate(t1, [], 2)
    cache.allocate(t2, [], 2)  # both looked up before either registered
    cache.register(t1, hs, tokens, 1)
    cache.register(t2, hs, tokens, 1)
    assert cache.take_events() == [BlockStored(hs, None, [1, 2], BS)] * 2
    assert cache.num_cached == 2
    cache.free(t1)
    cache.free(t2)
    cache.allocate(BlockTable(), [], 3)  # 2 plain blocks, then evicts one copy
    assert cache.take_events() == [BlockRemoved(hs)]
    assert cache.is_cached(hs[0])  # the other copy still serves hits


def test_generated_tokens_extend_the_chain_with_the_right_parent() -> None:
    cache = KVCache(8, BS)
    prompt = [1, 2, 3]
    table = store(cache, prompt)
    cache.take_events()
    grown = [*prompt, 40, 41]  # two generated tokens complete block 1 and start block 2
    cache.allocate(table, [], 1)
    hs = hashes_of(grown)
    cache.register(table, hs, grown, 2)
    assert cache.take_events() == [BlockStored([hs[1]], hs[0], [3, 40], BS)]


def test_reset_refused_while_blocks_are_held_then_clears() -> None:
    cache = KVCache(4, BS)
    table = store(cache, [1, 2, 3, 4])
    cache.take_events()
    assert cache.reset_prefix_cache() is False
    assert cache.take_events() == []
    cache.free(table)
    assert cache.reset_prefix_cache() is True
    assert cache.take_events() == [AllBlocksCleared()]
    assert cache.cached_hashes() == set()
    assert cache.num_cached == 0
    assert cache.num_free == 4


def test_usage_counts_held_blocks_only() -> None:
    cache = KVCache(4, BS)
    table = store(cache, [1, 2, 3])
    assert cache.usage == pytest.approx(0.5)
    cache.free(table)
    assert cache.usage == 0.0
    assert cache.num_cached == 1  # the full block stays cached while free
