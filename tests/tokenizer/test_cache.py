"""The segment cache's LRU bounds and counters."""

from __future__ import annotations

import pytest

from kvrouter.tokenizer.cache import SegmentCache


def test_hits_misses_and_lru_order() -> None:
    cache = SegmentCache(max_entries=2, max_tokens=100)
    assert cache.get_many(["a"]) == [None]
    cache.put_many([("a", (1,)), ("b", (2, 3))])
    assert cache.get_many(["a", "b"]) == [(1,), (2, 3)]
    cache.get_many(["a"])  # "a" is now the most recently used
    cache.put_many([("c", (4,))])
    assert cache.get_many(["b", "a", "c"]) == [None, (1,), (4,)]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries, stats.tokens) == (
        5,
        2,
        1,
        2,
        2,
    )
    assert stats.hit_ratio == pytest.approx(5 / 7)


def test_token_bound_evicts_oldest_until_it_holds() -> None:
    cache = SegmentCache(max_entries=100, max_tokens=5)
    cache.put_many([("a", (1, 1)), ("b", (2, 2)), ("c", (3, 3))])
    assert cache.get_many(["a", "b", "c"]) == [None, (2, 2), (3, 3)]
    assert cache.stats().tokens == 4


def test_entry_larger_than_budget_is_not_stored() -> None:
    cache = SegmentCache(max_entries=100, max_tokens=3)
    cache.put_many([("small", (1,)), ("huge", (1, 2, 3, 4))])
    assert cache.get_many(["small", "huge"]) == [(1,), None]


def test_replacing_a_key_keeps_the_token_count_right() -> None:
    cache = SegmentCache(max_entries=10, max_tokens=10)
    cache.put_many([("a", (1, 2, 3))])
    cache.put_many([("a", (1,))])
    assert cache.stats().tokens == 1


def test_clear_keeps_counters() -> None:
    cache = SegmentCache(max_entries=10, max_tokens=10)
    cache.put_many([("a", (1,))])
    cache.get_many(["a"])
    cache.clear()
    stats = cache.stats()
    assert (stats.entries, stats.tokens, stats.hits) == (0, 0, 1)
    assert SegmentCache(1, 1).stats().hit_ratio == 0.0


@pytest.mark.parametrize(("entries", "tokens"), [(0, 10), (10, 0), (-1, 5)])
def test_bounds_must_be_positive(entries: int, tokens: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SegmentCache(entries, tokens)
