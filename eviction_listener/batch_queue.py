"""A bounded FIFO that a consumer drains in batches: the listener's one hand-off queue.

Two hand-offs use it: the ZMQ source's reader tasks to its consumer (items per engine
message), and the listener's pumps and notice task to its flush task (items per worker).
Producers wait while it is full, which is the back-pressure that keeps a slow Redis from
growing memory without bound; the consumer takes whatever is queued, up to a count and,
when items have a weight, up to a total weight, so one flush stays one bounded round trip.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class BatchQueue(Generic[T]):
    """Bounded FIFO between producer tasks and one consumer.

    `close()` wakes everyone: producers return without queueing, the consumer drains what is
    queued and then gets ``[]``. `fail(exc)` stops the consumer at once: its next
    `get_many` raises ``on_failure(exc)`` (chained to `exc`), even with items queued.
    """

    def __init__(
        self,
        capacity: int,
        *,
        weight: Callable[[T], int] | None = None,
        on_failure: Callable[[BaseException], BaseException] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._items: deque[T] = deque()
        self._capacity = capacity
        self._weight = weight
        self._on_failure = on_failure or (lambda exc: RuntimeError("the producer failed"))
        self._not_empty = asyncio.Event()
        self._not_full = asyncio.Event()
        self._closed = False
        self._error: BaseException | None = None

    async def put(self, item: T) -> None:
        """Queue one item, waiting while the queue is full."""
        await self.put_many((item,))

    async def put_many(self, items: Iterable[T]) -> None:
        """Queue `items` together once there is room (a group may overshoot the capacity:
        what one producer hands over at once stays in order and in one piece)."""
        while len(self._items) >= self._capacity and not self._closed:
            self._not_full.clear()
            await self._not_full.wait()
        if self._closed:
            return
        self._items.extend(items)
        self._not_empty.set()

    async def get_many(self, max_items: int, max_weight: int | None = None) -> list[T]:
        """Wait for at least one item; take up to `max_items` whole items whose total weight
        stays within `max_weight` (the first item is always taken). [] once closed and
        drained."""
        while True:
            # A failed producer stops the consumer even with items queued: that producer's
            # stream has stopped, and carrying on with the others would hide it.
            if self._error is not None:
                raise self._on_failure(self._error) from self._error
            if self._items:
                break
            if self._closed:
                return []
            self._not_empty.clear()
            await self._not_empty.wait()
        items = self._items
        out: list[T] = []
        budget = max_weight if self._weight is not None else None
        while items and len(out) < max_items:
            if budget is not None:
                assert self._weight is not None
                w = self._weight(items[0])
                if out and w > budget:
                    break
                budget -= w
            out.append(items.popleft())
        self._not_full.set()
        return out

    def close(self) -> None:
        """No more items: wake the consumer (it drains, then gets []) and any producer."""
        self._closed = True
        self._not_empty.set()
        self._not_full.set()

    def fail(self, exc: BaseException) -> None:
        """A producer died on `exc`: the consumer's next `get_many` raises."""
        self._error = exc
        self._not_empty.set()

    def __len__(self) -> int:
        return len(self._items)
