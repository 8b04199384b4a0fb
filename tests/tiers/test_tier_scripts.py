"""Lower storage tiers in the index (#17 item 7): store_tier_blocks and lookup_tiers against a
real Redis, standalone and a 3-master Cluster (``any_client``)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from kvrouter.index.errors import ScriptArgumentError
from kvrouter.index.results import continue_on_tiers
from kvrouter.index.scripts import ResidencyIndex, pack_u64

M = "tiered-model"
W = "w1"


def chain(n: int, seed: int = 7) -> list[int]:
    return [(seed << 40) + i + 1 for i in range(n)]


def engine(keys: list[int]) -> list[int]:
    """Engine hashes of the chain's blocks (any distinct u64s: the tier map links them)."""
    return [k ^ 0xABCDEF for k in keys]


@pytest.fixture
def idx(any_client: Any) -> ResidencyIndex:
    return ResidencyIndex(any_client)


async def store_tier(
    idx: ResidencyIndex, keys: list[int], *, worker: str = W, medium: str = "CPU", **kw: Any
) -> Any:
    fields = [x for e, k in zip(engine(keys), keys, strict=True) for x in (e, k)]
    return await idx.store_tier_blocks(
        M, worker, medium, "S" * len(keys), pack_u64(fields), ttl_ms=60_000, **kw
    )


async def test_tier_depth_continues_past_the_gpu_depth(idx: ResidencyIndex) -> None:
    c = chain(10)
    await idx.record(M, W, c[:4], ttl_new_ms=60_000)
    r = await store_tier(idx, c[:7])
    assert (r.stored, r.removed, r.unknown, r.trimmed) == (7, 0, 0, 0)
    res = await idx.lookup_with_tiers(M, c, ["CPU", "DISK"], [W, "w2"])
    assert res.depth(W) == 4
    assert res.tiers == {"CPU": {W: (4, 3)}}
    # Blocks 5-7 are on the CPU tier only: the chain continues there for 3 blocks.
    assert res.tier_depths(W) == {"CPU": 3}
    assert res.tier_depths(W, limit=5) == {"CPU": 1}
    assert res.tier_depths("w2") == {}


async def test_a_worker_with_only_tier_blocks_is_found(idx: ResidencyIndex) -> None:
    c = chain(6)
    await store_tier(idx, c, worker="cold-gpu")
    res = await idx.lookup_with_tiers(M, c, ["CPU"], None)
    assert res.depths == {}
    assert res.tier_depths("cold-gpu") == {"CPU": 6}


async def test_removal_on_a_medium_removes_that_tier_only(idx: ResidencyIndex) -> None:
    c = chain(5)
    await idx.record(M, W, c, ttl_new_ms=60_000)
    await store_tier(idx, c)
    eh = engine(c)
    r = await idx.store_tier_blocks(M, W, "CPU", "DD", pack_u64([eh[4], 12345]), ttl_ms=60_000)
    assert (r.removed, r.unknown) == (1, 1)
    res = await idx.lookup_with_tiers(M, c, ["CPU"], [W])
    assert res.depth(W) == 5  # the GPU records are untouched
    assert res.tier_depths(W) == {}  # block 5 was the one after the GPU prefix
    # And a GPU eviction leaves the tier copy: the chain continues on the CPU tier.
    await idx.evict(M, W, c[2:])
    res = await idx.lookup_with_tiers(M, c, ["CPU"], [W])
    assert res.depth(W) == 2
    assert res.tier_depths(W) == {"CPU": 2}


async def test_first_medium_in_order_wins_and_gaps_end_the_run(idx: ResidencyIndex) -> None:
    c = chain(8)
    await store_tier(idx, c[:3], medium="CPU")
    await store_tier(idx, c[:6], medium="DISK")
    res = await idx.lookup_with_tiers(M, c, ["CPU", "DISK"], [W])
    assert res.tier_depths(W) == {"CPU": 3, "DISK": 3}
    assert continue_on_tiers(0, {"CPU": {W: (0, 2)}, "DISK": {W: (0, 5)}}, W) == {
        "CPU": 2,
        "DISK": 3,
    }
    # A run seen past another GPU depth (the lookup cut the match at a hole) is not used.
    assert continue_on_tiers(1, {"CPU": {W: (4, 2)}}, W) == {}


async def test_capacity_trims_the_least_recently_stored(idx: ResidencyIndex) -> None:
    old, new = chain(4, seed=1), chain(4, seed=2)
    # Explicit clocks must be near the real one: keys get PEXPIREAT from them.
    T0 = int(time.time() * 1000)
    await store_tier(idx, old, now_ms=T0)
    r = await store_tier(idx, new, capacity=6, now_ms=T0 + 500)
    assert r.trimmed == 2
    res = await idx.lookup_with_tiers(M, old, ["CPU"], [W], now_ms=T0 + 600)
    assert res.tiers["CPU"][W] == (0, 2)  # the old chain lost its tail first
    res = await idx.lookup_with_tiers(M, new, ["CPU"], [W], now_ms=T0 + 600)
    assert res.tiers["CPU"][W] == (0, 4)


async def test_tier_records_expire_and_the_tier_forgets_the_worker(idx: ResidencyIndex) -> None:
    c = chain(3)
    t0 = int(time.time() * 1000)
    fields = pack_u64([x for e, k in zip(engine(c), c, strict=True) for x in (e, k)])
    await idx.store_tier_blocks(M, W, "CPU", "SSS", fields, ttl_ms=60_000, now_ms=t0)
    res = await idx.lookup_with_tiers(M, c, ["CPU"], [W], now_ms=t0 + 59_999)
    assert res.tiers == {"CPU": {W: (0, 3)}}
    res = await idx.lookup_with_tiers(M, c, ["CPU"], [W], now_ms=t0 + 60_001)
    assert res.tiers == {}
    # Removing the last block drops the map and the worker from the tier's set.
    eh = engine(c)
    await idx.store_tier_blocks(M, W, "CPU", "DDD", pack_u64(eh), ttl_ms=60_000, now_ms=t0 + 100)
    k = idx.keys(M)
    assert await idx.client.exists(k.tier("CPU", W), k.tier_map("CPU", W)) == 0
    assert await idx.client.zscore(k.tier_workers("CPU"), W) is None


async def test_arguments_are_checked(idx: ResidencyIndex) -> None:
    with pytest.raises(ScriptArgumentError, match="medium"):
        await idx.store_tier_blocks(M, W, "C P U", "", "", ttl_ms=1)
    with pytest.raises(ScriptArgumentError, match="ops"):
        await idx.store_tier_blocks(M, W, "CPU", "X", "", ttl_ms=1)
    with pytest.raises(Exception, match="fields"):
        await idx.store_tier_blocks(M, W, "CPU", "S", pack_u64([1]), ttl_ms=1)


async def test_clear_then_store_in_one_call(idx: ResidencyIndex) -> None:
    c = chain(4)
    await store_tier(idx, c)
    eh = engine(c)
    r = await idx.store_tier_blocks(M, W, "CPU", "CS", pack_u64([eh[0], c[0]]), ttl_ms=60_000)
    assert (r.stored, r.removed) == (1, 4)
    res = await idx.lookup_with_tiers(M, c, ["CPU"], [W])
    assert res.tiers == {"CPU": {W: (0, 1)}}
