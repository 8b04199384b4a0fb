"""A bounded, thread-safe LRU cache of token ids per text segment.

The router runs on asyncio but may tokenize a huge prompt in a thread executor, so every
access to the shared map is made under one lock. Tokenization itself happens outside the lock:
two threads that miss the same segment at once both tokenize it and store the same ids, which
costs a little duplicate work and never a wrong answer.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of the segment cache's counters, for metrics."""

    hits: int
    misses: int
    evictions: int
    entries: int
    tokens: int
    max_entries: int
    max_tokens: int

    @property
    def hit_ratio(self) -> float:
        """Hits over lookups; 0.0 before the first lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class SegmentCache:
    """LRU map from a segment key to its token ids, bounded by entries and by total tokens.

    Token ids are stored as tuples: concatenating tuples into the result list is a pointer
    copy, about ten times faster than unpacking a packed array, and the concatenation is what
    every cached request pays for. The price is memory (about 36 bytes per cached token on
    CPython), which is why the cache is bounded by tokens and not only by entries.
    """

    def __init__(self, max_entries: int, max_tokens: int) -> None:
        if max_entries < 1 or max_tokens < 1:
            raise ValueError("max_entries and max_tokens must be at least 1")
        self._max_entries = max_entries
        self._max_tokens = max_tokens
        self._map: OrderedDict[Hashable, tuple[int, ...]] = OrderedDict()
        self._tokens = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[Hashable]) -> list[tuple[int, ...] | None]:
        """Look up every key under one lock; hits become most recently used."""
        found: list[tuple[int, ...] | None] = []
        with self._lock:
            for key in keys:
                ids = self._map.get(key)
                if ids is None:
                    self._misses += 1
                else:
                    self._hits += 1
                    self._map.move_to_end(key)
                found.append(ids)
        return found

    def put_many(self, items: Iterable[tuple[Hashable, tuple[int, ...]]]) -> None:
        """Store entries, then evict least recently used ones until both bounds hold.

        An entry larger than the whole token budget is not stored: it would only flush the
        cache and be evicted itself.
        """
        with self._lock:
            for key, ids in items:
                if len(ids) > self._max_tokens:
                    continue
                old = self._map.pop(key, None)
                if old is not None:
                    self._tokens -= len(old)
                self._map[key] = ids
                self._tokens += len(ids)
            while len(self._map) > self._max_entries or self._tokens > self._max_tokens:
                _, evicted = self._map.popitem(last=False)
                self._tokens -= len(evicted)
                self._evictions += 1

    def clear(self) -> None:
        """Drop every entry; counters are kept (they are cumulative, as metrics expect)."""
        with self._lock:
            self._map.clear()
            self._tokens = 0

    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._map),
                tokens=self._tokens,
                max_entries=self._max_entries,
                max_tokens=self._max_tokens,
            )
