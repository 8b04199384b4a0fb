"""Replicas that decide one burst on the same shared load: the re-check (Router.recheck).

Two routers over one real Redis both finish their lookup before either takes its lease (a
barrier after the lookup makes the race certain instead of likely), as four replicas each
deciding part of a same-millisecond burst do. Without the re-check both send their request
to the one least-loaded worker; with it the second one sees the first one's lease land in
its reservation and moves. Either way no lease outlives its request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kvrouter.index.scripts import ResidencyIndex
from router_node.app import METRICS, ROUTER, RouterServer
from tests.router.conftest import MODEL, StartRouter, openai_client, settle
from tests.support.fake_worker import FakeWorker

HOUR_MS = 3_600_000


def _gate_lookups(monkeypatch: pytest.MonkeyPatch, routers: list[RouterServer]) -> None:
    """Every router's next lookup returns only once all of them have looked up."""
    barrier = asyncio.Barrier(len(routers))
    for r in routers:
        shared = r.app[ROUTER].shared
        real = shared.lookup

        async def gated(*args: Any, _real: Any = real, **kw: Any) -> Any:
            result = await _real(*args, **kw)
            await asyncio.wait_for(barrier.wait(), 10)
            return result

        monkeypatch.setattr(shared, "lookup", gated)


def _rechecks(r: RouterServer, outcome: str) -> float:
    v = r.app[METRICS].registry.get_sample_value(
        "kvrouter_lease_rechecks_total", {"outcome": outcome}
    )
    return v or 0.0


async def _others_hold_zero_one_two(idx: ResidencyIndex, workers: list[FakeWorker]) -> None:
    """Another replica's requests: none on the first worker, one on the second, two on the
    third (so the workers rank first, second, third for a request without a match)."""
    for n, w in enumerate(workers):
        for k in range(n):
            await idx.acquire_lease(
                MODEL, w.id, f"other-{w.port}-{k}", prefill_tokens=0, ttl_ms=HOUR_MS
            )


async def _only_the_others_remain(idx: ResidencyIndex, workers: list[FakeWorker]) -> None:
    """Every lease and reservation this test's routers took went back: only the other
    replica's requests (`_others_hold_zero_one_two`) are left in flight."""
    got = await idx.lookup(MODEL, [1])
    assert {w: x.requests for w, x in got.load.items()} == {
        w.id: n for n, w in enumerate(workers) if n
    }


@pytest.mark.parametrize("mode", ["off", "auto"])
async def test_two_replicas_deciding_one_burst(
    mode: str,
    start_router: StartRouter,
    workers: list[FakeWorker],
    redis_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    idx = ResidencyIndex(redis_client)
    # A third replica holds one request on each of the other two workers: the first worker
    # is the least loaded, and both routers see requests in flight they do not hold.
    for w in workers[1:]:
        await idx.acquire_lease(MODEL, w.id, f"other-{w.port}", prefill_tokens=0, ttl_ms=HOUR_MS)
    a = await start_router(workers, lease_recheck=mode)
    b = await start_router(workers, lease_recheck=mode)
    _gate_lookups(monkeypatch, [a, b])

    async def ask(r: RouterServer, text: str) -> None:
        resp = await openai_client(r).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=2
        )
        assert resp.choices

    await asyncio.gather(
        ask(a, "first question of the burst " * 20), ask(b, "second question of a burst " * 20)
    )
    served = [w.served() for w in workers]
    assert sum(served) == 2
    if mode == "off":
        # Both decided on the same load: both on the least-loaded worker.
        assert served == [2, 0, 0]
        assert _rechecks(a, "moved") + _rechecks(b, "moved") == 0
    else:
        # The second reservation saw the first one's lease: it moved, and its new worker's
        # reservation was checked too (nothing landed there: kept).
        assert served[0] == 1 and max(served) == 1
        assert _rechecks(a, "kept") + _rechecks(b, "kept") == 2
        assert _rechecks(a, "moved") + _rechecks(b, "moved") == 1
    # Every lease went back: the moved request's first reservation, and the reservations the
    # dispatches adopted (taken once, released once). Only the third replica's remain.
    await settle(a, b)
    got = await idx.lookup(MODEL, [1])
    assert {w: (x.requests, x.prefill_tokens) for w, x in got.load.items()} == {
        w.id: (1, 0) for w in workers[1:]
    }


async def test_one_replica_alone_does_not_recheck(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    # Alone, a replica's own counts are current: auto never spends the round trip.
    r = await start_router(workers)
    client = openai_client(r)
    for i in range(4):
        await client.completions.create(model=MODEL, prompt=f"prompt number {i} " * 10)
        await settle(r)
    assert _rechecks(r, "kept") + _rechecks(r, "moved") == 0


async def test_a_release_elsewhere_does_not_move_the_request(
    start_router: StartRouter,
    workers: list[FakeWorker],
    redis_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The re-check moves a request only when load landed on its chosen worker after the
    lookup. Here the chosen worker's load is unchanged and another worker's lease is given
    back in between, which makes that worker cheaper: the decision stands."""
    idx = ResidencyIndex(redis_client)
    # Another replica's requests: one on each worker, the first one's already past prefill.
    for w, prefill in zip(workers, (0, 5000, 5000), strict=True):
        await idx.acquire_lease(
            MODEL, w.id, f"other-{w.port}", prefill_tokens=prefill, ttl_ms=HOUR_MS
        )
    r = await start_router(workers, lease_recheck="on")
    shared = r.app[ROUTER].shared
    real = shared.lookup
    last = workers[-1]

    async def lookup_then_release(*args: Any, **kw: Any) -> Any:
        result = await real(*args, **kw)
        # Between the lookup and the re-check the last worker empties.
        await idx.release_lease(MODEL, last.id, f"other-{last.port}", prefill_tokens=5000)
        return result

    monkeypatch.setattr(shared, "lookup", lookup_then_release)
    resp = await openai_client(r).completions.create(
        model=MODEL, prompt="a question of its own " * 20, max_tokens=2
    )
    assert resp.choices
    assert [w.served() for w in workers] == [1, 0, 0]
    assert (_rechecks(r, "kept"), _rechecks(r, "moved")) == (1, 0)


async def test_requests_that_leave_together_do_not_land_together(
    start_router: StartRouter,
    workers: list[FakeWorker],
    redis_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three replicas decide one burst on the same load and all reserve the least-loaded
    worker. The first reservation stands; the other two both re-score and both pick the same
    second choice. The second of those to land must be re-checked too and move on, so the
    burst spreads as one router would place it (one request on each worker), not two on the
    second choice and none on the third."""
    idx = ResidencyIndex(redis_client)
    await _others_hold_zero_one_two(idx, workers)
    routers = [await start_router(workers, lease_recheck="on") for _ in range(3)]
    _gate_lookups(monkeypatch, routers)
    # And every router's first reservation returns only once all three have landed.
    landed = asyncio.Barrier(len(routers))
    for r in routers:
        shared = r.app[ROUTER].shared
        real = shared.reserve
        calls = [0]

        async def gated(*args: Any, _real: Any = real, _calls: list[int] = calls, **kw: Any) -> Any:
            result = await _real(*args, **kw)
            _calls[0] += 1
            if _calls[0] == 1:
                await asyncio.wait_for(landed.wait(), 10)
            return result

        monkeypatch.setattr(shared, "reserve", gated)

    async def ask(r: RouterServer, text: str) -> None:
        resp = await openai_client(r).completions.create(model=MODEL, prompt=text, max_tokens=2)
        assert resp.choices

    await asyncio.gather(
        *(
            ask(r, f"question {i} of one burst, with words of its own " * 12)
            for i, r in enumerate(routers)
        )
    )
    assert [w.served() for w in workers] == [1, 1, 1]
    moved = sum(_rechecks(r, "moved") for r in routers)
    kept = sum(_rechecks(r, "kept") for r in routers)
    assert (kept, moved) == (3, 3)
    await settle(*routers)
    await _only_the_others_remain(idx, workers)


async def test_one_replicas_burst_is_spread_while_its_reservations_are_in_flight(
    start_router: StartRouter,
    workers: list[FakeWorker],
    redis_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One replica decides three requests of a burst while the first ones wait for their
    reservations: each later decision must count the earlier ones where they are going, so
    the burst spreads at once and no re-check has to move anything."""
    idx = ResidencyIndex(redis_client)
    await _others_hold_zero_one_two(idx, workers)
    r = await start_router(workers, lease_recheck="on")
    shared = r.app[ROUTER].shared
    real = shared.reserve
    # No first reservation reaches Redis until all three requests have been decided.
    decided = asyncio.Barrier(3)
    calls = [0]

    async def gated(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] <= 3:
            await asyncio.wait_for(decided.wait(), 10)
        return await real(*args, **kw)

    monkeypatch.setattr(shared, "reserve", gated)
    client = openai_client(r)

    async def ask(text: str) -> None:
        resp = await client.completions.create(model=MODEL, prompt=text, max_tokens=2)
        assert resp.choices

    await asyncio.gather(*(ask(f"burst request {i} with words of its own " * 12) for i in range(3)))
    assert [w.served() for w in workers] == [1, 1, 1]
    assert (_rechecks(r, "kept"), _rechecks(r, "moved")) == (3, 0)
    await settle(r)
    await _only_the_others_remain(idx, workers)
    # The claims went with the requests: this replica counts nothing in flight.
    assert [(w.inflight, w.prefill_pending) for w in r.app[ROUTER].pool.workers.values()] == [
        (0, 0)
    ] * 3
