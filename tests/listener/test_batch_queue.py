"""The listener's bounded batch queue: order, batch limits, back-pressure, close, failure."""

from __future__ import annotations

import asyncio

import pytest

from eviction_listener.batch_queue import BatchQueue


class Broken(RuntimeError):
    pass


async def test_fifo_in_batches_by_count_and_weight() -> None:
    q: BatchQueue[str] = BatchQueue(100, weight=len)
    await q.put_many(["aaaa", "b", "cc", "dddddd", "e"])
    assert await q.get_many(2) == ["aaaa", "b"]
    # weight budget 7: "cc" (2) fits, "dddddd" (6) would not
    assert await q.get_many(10, max_weight=7) == ["cc"]
    # the first item is taken even over the budget, so nothing is stuck
    assert await q.get_many(10, max_weight=1) == ["dddddd"]
    assert len(q) == 1


async def test_a_full_queue_holds_producers_until_the_consumer_takes() -> None:
    q: BatchQueue[int] = BatchQueue(2)
    await q.put(1)
    await q.put(2)
    blocked = asyncio.create_task(q.put(3))
    await asyncio.sleep(0.01)
    assert not blocked.done() and len(q) == 2
    assert await q.get_many(1) == [1]
    await asyncio.wait_for(blocked, 1.0)
    assert await q.get_many(10) == [2, 3]


async def test_close_drains_then_ends_and_wakes_producers() -> None:
    q: BatchQueue[int] = BatchQueue(1)
    await q.put(1)
    blocked = asyncio.create_task(q.put(2))
    waiter_q: BatchQueue[int] = BatchQueue(1)
    waiter = asyncio.create_task(waiter_q.get_many(1))
    await asyncio.sleep(0.01)
    q.close()
    waiter_q.close()
    await asyncio.wait_for(blocked, 1.0)  # returns without queueing
    assert await q.get_many(10) == [1]
    assert await q.get_many(10) == []
    assert await asyncio.wait_for(waiter, 1.0) == []


async def test_failure_stops_the_consumer_even_with_items_queued() -> None:
    q: BatchQueue[int] = BatchQueue(10, on_failure=lambda exc: Broken("producer died"))
    await q.put(1)
    cause = ValueError("boom")
    q.fail(cause)
    with pytest.raises(Broken) as info:
        await q.get_many(10)
    assert info.value.__cause__ is cause


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        BatchQueue[int](0)
