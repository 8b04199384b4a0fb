"""The Lua scripts on a real Redis: once standalone, once on a 3-master Cluster."""

from __future__ import annotations

import random
import re
import time
from importlib import resources
from typing import Any

import pytest

from kvrouter.index.errors import ScriptArgumentError, ScriptErrorCode
from kvrouter.index.keys import KeySchema
from kvrouter.index.scripts import EngineBlock, ResidencyIndex, ScriptCall, load_scripts

pytestmark = pytest.mark.redis
M = "model-a"
# A fixed "now" (ms) a day ahead of the real clock: liveness, judged by scores, is then
# deterministic, while key-level PEXPIREATs (set from these times) stay in the future.
T0 = int(time.time() * 1000) + 86_400_000
HOUR = 3_600_000


def chain(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(n)]


@pytest.fixture
def idx(any_client: Any) -> ResidencyIndex:
    return ResidencyIndex(any_client)


async def test_lookup_matches_brute_force(idx: ResidencyIndex) -> None:
    """Random fleets: every worker's depth equals the length of the prefix it recorded."""
    rng = random.Random(11)
    for case in range(40):
        n = rng.choice([1, 2, 3, 17, 64, 257, 600])
        c = chain(n, seed=case)
        expected: dict[str, int] = {}
        for w in range(rng.randint(1, 12)):
            d = rng.choice([0, 1, n, rng.randint(0, n), rng.randint(0, n)])
            worker = f"c{case}-w{w}"
            if d:
                await idx.record(M, worker, c[:d], ttl_new_ms=HOUR, now_ms=T0)
                expected[worker] = d
            # Unrelated chains on the same worker must not confuse the search.
            await idx.record(
                M,
                worker,
                chain(rng.randint(1, 50), seed=1000 + case * 20 + w),
                ttl_new_ms=HOUR,
                now_ms=T0,
            )
        got = await idx.lookup(M, c, now_ms=T0 + 1)
        assert got.depths == expected, f"case {case}, n={n}"
        if expected:
            some = sorted(expected)[: max(1, len(expected) // 2)]
            got = await idx.lookup(M, c, candidates=some, now_ms=T0 + 1)
            assert got.depths == {w: expected[w] for w in some}


async def test_expiry_and_speculative_ttl(idx: ResidencyIndex) -> None:
    c = chain(10)
    await idx.record(M, "w1", c, ttl_new_ms=1000, now_ms=T0)
    assert (await idx.lookup(M, c, now_ms=T0 + 900)).depth("w1") == 10
    assert (await idx.lookup(M, c, now_ms=T0 + 1001)).depths == {}
    # The held prefix gets the long TTL, the new tail the short one.
    await idx.record(M, "w2", c[:4], ttl_new_ms=HOUR, now_ms=T0)
    r = await idx.record(M, "w2", c, ttl_new_ms=1000, ttl_held_ms=HOUR, held=4, now_ms=T0 + 10)
    assert (r.added, r.refreshed) == (6, 4)
    assert (await idx.lookup(M, c, now_ms=T0 + 500)).depth("w2") == 10
    assert (await idx.lookup(M, c, now_ms=T0 + 5000)).depth("w2") == 4
    # Scores never move backwards: a short-lived record does not shorten a long one.
    await idx.record(M, "w2", c[:4], ttl_new_ms=10, now_ms=T0 + 20)
    assert (await idx.lookup(M, c, now_ms=T0 + 5000)).depth("w2") == 4
    # A later record drops what has expired.
    r = await idx.record(M, "w1", chain(2, seed=9), ttl_new_ms=HOUR, now_ms=T0 + 2000)
    assert r.expired == 10


async def test_capacity_trims_tails_first(idx: ResidencyIndex, any_client: Any) -> None:
    a, b = chain(8, seed=1), chain(8, seed=2)
    await idx.record(M, "w", a, ttl_new_ms=HOUR, now_ms=T0)
    r = await idx.record(M, "w", b, ttl_new_ms=HOUR, capacity=12, now_ms=T0 + 1)
    assert (r.added, r.evicted) == (8, 4)
    assert (await idx.lookup(M, a, now_ms=T0 + 2)).depth("w") == 4  # a's tail went first
    assert (await idx.lookup(M, b, now_ms=T0 + 2)).depth("w") == 8
    assert await any_client.zcard(KeySchema().model(M).worker("w")) == 12
    # A bounded trim per call: limit caps the work, the next call finishes it.
    r = await idx.record(
        M, "w", chain(8, seed=3), ttl_new_ms=HOUR, capacity=4, limit=5, now_ms=T0 + 3
    )
    assert r.evicted == 5


async def test_evict_marks_holes(idx: ResidencyIndex) -> None:
    c = chain(40)
    await idx.record(M, "w", c, ttl_new_ms=HOUR, now_ms=T0)
    assert await idx.evict(M, "w", [c[20]], now_ms=T0) == 1
    assert (await idx.lookup(M, c, now_ms=T0 + 1)).depth("w") == 20
    assert await idx.evict(M, "w", [c[5], 12345], now_ms=T0) == 1  # unknown keys count 0
    assert (await idx.lookup(M, c, now_ms=T0 + 1)).depth("w") == 5
    # Recording the chain again fills the holes.
    await idx.record(M, "w", c, ttl_new_ms=HOUR, now_ms=T0 + 2)
    assert (await idx.lookup(M, c, now_ms=T0 + 3)).depth("w") == 40
    # A tail eviction without holes behaves the same, cheaply.
    assert await idx.evict(M, "w", c[30:], mark_holes=False, now_ms=T0) == 10
    assert (await idx.lookup(M, c, now_ms=T0 + 3)).depth("w") == 30


async def test_correct_chain_cuts_the_subtree_of_one_worker(
    idx: ResidencyIndex, any_client: Any
) -> None:
    """Feedback: the engine had 6 blocks of a chain the router matched 30 deep on w1. The
    correction drops w1's blocks past 6 and cuts every chain through block 6 (a sibling that
    shares 20 blocks), leaves w2 alone, and is idempotent; a new record fills the hole."""
    c = chain(30)
    sibling = c[:20] + chain(10, seed=1)
    for w in ("w1", "w2"):
        await idx.record(M, w, c, ttl_new_ms=HOUR, now_ms=T0)
        await idx.record(M, w, sibling, ttl_new_ms=HOUR, now_ms=T0)
    assert await idx.correct_chain(M, "w1", c[6:30], now_ms=T0) == (24, 0)
    for ch in (c, sibling):
        assert (await idx.lookup(M, ch, now_ms=T0 + 1)).depths == {"w1": 6, "w2": 30}
    k = KeySchema().model(M)
    assert await any_client.zcard(k.lru("w1")) == await any_client.zcard(k.worker("w1")) == 16
    # A second replica reporting the same shortfall finds nothing left to drop.
    assert await idx.correct_chain(M, "w1", c[6:30], now_ms=T0) == (0, 0)
    assert (await idx.lookup(M, sibling, now_ms=T0 + 1)).depths == {"w1": 6, "w2": 30}
    # The engine computed the chain; its next record makes it matchable again.
    await idx.record(M, "w1", c, ttl_new_ms=HOUR, now_ms=T0 + 2)
    assert (await idx.lookup(M, c, now_ms=T0 + 3)).depth("w1") == 30
    with pytest.raises(ScriptArgumentError):
        await idx.correct_chain(M, "w1", [], now_ms=T0)


async def test_correct_chain_with_a_cut_drops_what_lru_implies_is_gone(
    idx: ResidencyIndex, any_client: Any
) -> None:
    """A correction with a cut also drops the worker's records last accessed before it (an
    LRU engine that lost a block used after the cut lost every block used before it), in
    calls of at most `limit`, on that worker only; records accessed after the cut stay."""
    old = [chain(8, seed=s) for s in range(1, 6)]  # five chains accessed at T0 .. T0 + 4 s
    for i, ch in enumerate(old):
        for w in ("w1", "w2"):
            await idx.record(M, w, ch, ttl_new_ms=HOUR, now_ms=T0 + 1000 * i)
    hot = chain(8)
    await idx.record(M, "w1", hot, ttl_new_ms=HOUR, now_ms=T0 + 10_000)
    k = KeySchema().model(M)
    assert await any_client.zcard(k.lru("w1")) == 48
    # At T0 + 11 s the engine lacks hot[2:]; the cut is T0 + 2.5 s: the chains accessed at
    # T0, T0 + 1 s and T0 + 2 s go (24 records), 10 at a time.
    now, cut_us = T0 + 11_000, (T0 + 2_500) * 1000
    # What feedback weighs against the worker's capacity: blocks used since the cut.
    assert await idx.used_since(M, "w1", cut_us) == 8 + 8 + 8
    assert await idx.used_since(M, "w2", cut_us) == 8 + 8
    got = await idx.correct_chain(M, "w1", hot[2:], now_ms=now, cut_us=cut_us, limit=10)
    assert got == (6, 10)
    # The most recently used go first (a clear takes several calls; the next lookups most
    # likely match those): the chain of T0 + 2 s, then the first two blocks of T0 + 1 s's.
    assert (await idx.lookup(M, old[2], now_ms=now)).depths == {"w2": 8}
    assert (await idx.lookup(M, old[1], now_ms=now)).depths == {"w2": 8}
    assert (await idx.lookup(M, old[0], now_ms=now)).depths == {"w1": 8, "w2": 8}
    got = await idx.correct_chain(M, "w1", hot[2:], now_ms=now, cut_us=cut_us, limit=10)
    assert got == (0, 10)
    got = await idx.correct_chain(M, "w1", hot[2:], now_ms=now, cut_us=cut_us, limit=10)
    assert got == (0, 4)
    assert await any_client.zcard(k.lru("w1")) == await any_client.zcard(k.worker("w1")) == 2 + 16
    for i, ch in enumerate(old):
        depths = (await idx.lookup(M, ch, now_ms=now)).depths
        assert depths == ({"w2": 8} if i < 3 else {"w1": 8, "w2": 8}), i
    # A restart (an aborted stream) has no chain to drop: the cut alone, at T0 + 3.5 s.
    got = await idx.correct_chain(M, "w1", [], now_ms=now, cut_us=(T0 + 3_500) * 1000, limit=10)
    assert got == (0, 8)
    assert (await idx.lookup(M, old[3], now_ms=now)).depths == {"w2": 8}
    assert (await idx.lookup(M, old[4], now_ms=now)).depths == {"w1": 8, "w2": 8}
    assert (await idx.lookup(M, hot, now_ms=now)).depths == {"w1": 2}


async def test_clear_worker(idx: ResidencyIndex, any_client: Any) -> None:
    c = chain(50)
    await idx.record(M, "w1", c, ttl_new_ms=HOUR, now_ms=T0)
    await idx.record(M, "w2", c, ttl_new_ms=HOUR, now_ms=T0)
    await idx.evict(M, "w1", [c[3]], now_ms=T0)
    assert await idx.clear_worker(M, "w1") == 49
    assert (await idx.lookup(M, c, now_ms=T0 + 1)).depths == {"w2": 50}
    k = KeySchema().model(M)
    assert await any_client.exists(k.worker("w1"), k.cut("w1"), k.engine_map("w1")) == 0
    assert await idx.clear_worker(M, "nobody") == 0


async def test_engine_maps(idx: ResidencyIndex) -> None:
    keys = chain(4, seed=5)
    blocks = [EngineBlock(100 + i, (100 + i - 1) if i else None, keys[i]) for i in range(4)]
    r = await idx.store_engine_blocks(M, "w", blocks, ttl_ms=HOUR, now_ms=T0)
    assert (r.stored, r.duplicates, r.added) == (4, 0, 4)
    assert (await idx.lookup(M, keys, now_ms=T0 + 1)).depth("w") == 4
    assert await idx.resolve_engine_blocks(M, "w", [101, 999]) == [keys[1], None]
    # A duplicate copy of block 3: one removal leaves it resident.
    r = await idx.store_engine_blocks(M, "w", blocks[3:], ttl_ms=HOUR, now_ms=T0)
    assert (r.stored, r.duplicates) == (0, 1)
    rel = await idx.release_engine_blocks(M, "w", [103], now_ms=T0)
    assert (rel.released, rel.removed) == (1, 0)
    assert (await idx.lookup(M, keys, now_ms=T0 + 1)).depth("w") == 4
    # Removing a middle block that still has a child leaves a hole: the match stops there.
    rel = await idx.release_engine_blocks(M, "w", [101, 555], now_ms=T0)
    assert (rel.released, rel.removed, rel.unknown, rel.holes) == (1, 1, 1, 1)
    assert (await idx.lookup(M, keys, now_ms=T0 + 1)).depth("w") == 1
    # Tail-first removal (the engine's usual order) needs no hole.
    rel = await idx.release_engine_blocks(M, "w", [103, 102], now_ms=T0)
    assert (rel.removed, rel.holes) == (2, 0)


async def test_leases(idx: ResidencyIndex) -> None:
    load = await idx.acquire_lease(M, "w", "req-1", prefill_tokens=500, ttl_ms=1000, now_ms=T0)
    assert (load.requests, load.prefill_tokens) == (1, 500)
    await idx.acquire_lease(M, "w", "req-2", prefill_tokens=100, ttl_ms=1000, now_ms=T0)
    got = await idx.lookup(M, chain(1), now_ms=T0)
    assert (got.load["w"].requests, got.load["w"].prefill_tokens) == (2, 600)
    assert await idx.release_lease(M, "w", "req-1", prefill_tokens=500, prefilled_only=True)
    got = await idx.lookup(M, chain(1), now_ms=T0)
    assert (got.load["w"].requests, got.load["w"].prefill_tokens) == (2, 100)
    assert await idx.release_lease(M, "w", "req-1", prefill_tokens=0)
    assert not await idx.release_lease(M, "w", "req-1", prefill_tokens=0)  # already gone
    # req-2's router died: its lease expires and the next acquire gives the load back.
    load = await idx.acquire_lease(
        M, "w2", "req-3", prefill_tokens=0, ttl_ms=1000, now_ms=T0 + 5000
    )
    got = await idx.lookup(M, chain(1), now_ms=T0 + 5000)
    assert "w" not in got.load and got.load["w2"].requests == 1


async def test_reservation_is_adopted_by_the_lease(idx: ResidencyIndex) -> None:
    await idx.acquire_lease(M, "w2", "other", prefill_tokens=7, ttl_ms=HOUR, now_ms=T0)
    # A reservation takes the lease for a short while and reads every worker's load with it.
    loads = await idx.reserve_lease(M, "w", "req-1", prefill_tokens=300, ttl_ms=1000, now_ms=T0)
    assert {w: (x.requests, x.prefill_tokens) for w, x in loads.items()} == {
        "w": (1, 300),
        "w2": (1, 7),
    }
    # The dispatch takes the same lease with the full ttl: counted once, and it now lives an
    # hour (it outlives the reservation's second).
    load = await idx.acquire_lease(M, "w", "req-1", prefill_tokens=300, ttl_ms=HOUR, now_ms=T0)
    assert (load.requests, load.prefill_tokens) == (1, 300)
    await idx.acquire_lease(M, "w2", "late", prefill_tokens=0, ttl_ms=HOUR, now_ms=T0 + 5000)
    got = await idx.lookup(M, chain(1), now_ms=T0 + 5000)
    assert (got.load["w"].requests, got.load["w"].prefill_tokens) == (1, 300)
    # A reservation nobody adopts expires by itself and gives its load back.
    await idx.reserve_lease(M, "w", "lost", prefill_tokens=50, ttl_ms=1000, now_ms=T0 + 5000)
    await idx.acquire_lease(M, "w2", "later", prefill_tokens=0, ttl_ms=HOUR, now_ms=T0 + 7000)
    got = await idx.lookup(M, chain(1), now_ms=T0 + 7000)
    assert (got.load["w"].requests, got.load["w"].prefill_tokens) == (1, 300)


async def test_pipeline_record_and_lease(idx: ResidencyIndex) -> None:
    c = chain(8)
    rec, load = await idx.run_pipeline(
        [
            idx.record_call(M, "w", c, ttl_new_ms=HOUR, now_ms=T0),
            idx.acquire_lease_call(M, "w", "r1", prefill_tokens=128, ttl_ms=HOUR, now_ms=T0),
        ]
    )
    assert rec.added == 8 and load.prefill_tokens == 128


async def test_script_cache_flushed_first_call_works(idx: ResidencyIndex, any_client: Any) -> None:
    c = chain(3)
    await idx.record(M, "w", c, ttl_new_ms=HOUR, now_ms=T0)
    await any_client.script_flush()
    assert (await idx.lookup(M, c, now_ms=T0)).depth("w") == 3
    await any_client.script_flush()
    rec, lk = await idx.run_pipeline(
        [
            idx.record_call(M, "w2", c, ttl_new_ms=HOUR, now_ms=T0),
            idx.lookup_call(M, c, now_ms=T0),
        ]
    )
    assert rec.added == 3 and lk.depth("w") == 3


async def test_record_uses_the_server_clock_not_the_hosts(
    idx: ResidencyIndex, any_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no now_ms a record's scores come from Redis's clock: a router host whose clock
    is an hour fast still writes records that expire a TTL after Redis's now."""
    real = time.time
    monkeypatch.setattr("kvrouter.index.clock.time.time", lambda: real() + 3600)
    await idx.record(M, "w", chain(4), ttl_new_ms=60_000)
    reply = await any_client.time()
    if isinstance(reply, dict):  # Cluster: one (sec, usec) per node
        reply = next(iter(reply.values()))
    sec, usec = reply
    server_now = int(sec) * 1_000_000 + int(usec)
    k = KeySchema().model(M)
    scores = [s for _, s in await any_client.zrange(k.worker("w"), 0, -1, withscores=True)]
    assert len(scores) == 4
    # 60 s of life from the server's now (within the test's own run time), not 3,660 s.
    assert all(server_now + 50e6 <= s <= server_now + 61e6 for s in scores), scores
    assert sorted(scores, reverse=True) == [max(scores) - i for i in range(4)]


async def test_record_finished_after_a_script_flush_between_its_commands(
    idx: ResidencyIndex, any_client: Any
) -> None:
    """A flushed script cache hits a record after its ZADD: the finishing script is loaded and
    run alone, so the chain still gets its head entry and the worker its trim."""
    await idx.record(M, "w", chain(6, seed=1), ttl_new_ms=HOUR, now_ms=T0)
    await any_client.script_flush()
    rec = await idx.record(M, "w", chain(6, seed=2), ttl_new_ms=HOUR, now_ms=T0 + 1, capacity=8)
    assert (rec.added, rec.evicted) == (6, 4)
    got = await idx.lookup(M, chain(6, seed=2), now_ms=T0 + 1)
    assert got.depth("w") == 6


async def test_long_commands_are_packed_in_c(any_client: Any) -> None:
    """Clients from connect() pack a record's long ZADD with hiredis, byte for byte what
    redis-py would send."""
    from redis.asyncio.connection import Connection

    from kvrouter.index.connection import FAST_PACK_MIN_ARGS, fast_packing

    fast = fast_packing(Connection)()
    plain = Connection()
    for args in [
        ("ZADD", "k", "GT", "CH", *[x for i in range(40) for x in (10**15 + i, f"{i:016x}")]),
        ("CONFIG GET", *["maxmemory"] * FAST_PACK_MIN_ARGS),
        (b"SADD", "k\u00e9", b"\x00\xff", 7, *range(40)),
    ]:
        assert b"".join(fast.pack_command(*args)) == b"".join(plain.pack_command(*args))
    k = KeySchema().model(M).worker("w")
    members = {f"{i:016x}": float(10**15 + i) for i in range(500)}
    await any_client.zadd(k, members)
    assert dict(await any_client.zrange(k, 0, -1, withscores=True)) == members
    classes = (
        {type(c) for n in any_client.get_nodes() for c in n._connections}
        if hasattr(any_client, "get_nodes")
        else {type(c) for c in any_client.connection_pool._available_connections}
    )
    assert classes and all(getattr(c, "_kvr_fast_packing", False) for c in classes), classes


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"worker": "bad worker"}, "worker"),
        ({"worker": ""}, "worker"),
        ({"chain": [-1]}, "chain"),
        ({"chain": [2**64]}, "chain"),
        ({"chain": ["x"]}, "chain"),
        ({"ttl_new_ms": 0}, "ttl_new_ms"),
        ({"ttl_held_ms": -5}, "ttl_held_ms"),
        ({"ttl_new_ms": 10**12}, "ttl_new_ms"),
        ({"capacity": -1}, "capacity"),
        ({"capacity": 1.5}, "capacity"),
        ({"limit": 0}, "limit"),
        ({"now_ms": -1}, "now_ms"),
        ({"held": True}, "held"),
        ({"model": "a{b"}, "model"),
    ],
)
async def test_wrapper_rejects_bad_arguments(
    idx: ResidencyIndex, any_client: Any, kwargs: dict[str, Any], argument: str
) -> None:
    """A record is several commands (ZADD, then the script): every argument is checked
    before the first is sent, so a rejected record writes nothing at all."""
    args: dict[str, Any] = {"model": M, "worker": "w", "chain": [1, 2], "ttl_new_ms": HOUR}
    args.update(kwargs)
    with pytest.raises(ScriptArgumentError) as err:
        await idx.record(args.pop("model"), args.pop("worker"), args.pop("chain"), **args)
    assert err.value.argument == argument
    assert await any_client.keys("*") == []


async def test_other_wrappers_reject_bad_arguments(idx: ResidencyIndex) -> None:
    with pytest.raises(ScriptArgumentError, match="lease_id"):
        await idx.acquire_lease(M, "w", "has space", prefill_tokens=1, ttl_ms=1)
    with pytest.raises(ScriptArgumentError, match="ttl_ms"):
        await idx.acquire_lease(M, "w", "ok", prefill_tokens=1, ttl_ms=10**12)
    with pytest.raises(ScriptArgumentError, match="parent_hash"):
        await idx.store_engine_blocks(M, "w", [EngineBlock(1, -3, 2)], ttl_ms=1)
    with pytest.raises(ScriptArgumentError, match="engine_hashes"):
        await idx.release_engine_blocks(M, "w", [2**70])
    with pytest.raises(ScriptArgumentError, match="worker"):
        await idx.lookup(M, [1], candidates=["a|b"])


NOW_US = 1_800_000_000_000_000


def _raw_calls(k: Any, packed: str) -> list[tuple[str, list[str], list[Any], str]]:
    """(script, keys, args, the argument Lua must name) with every other argument valid."""
    w = "w"
    rec = [k.worker(w), k.cut(w), k.workers, k.head_prefix, k.lru(w)]
    store = [k.engine_map(w), k.worker(w), k.cut(w), k.workers, k.head_prefix, k.lru(w)]
    evict = [k.worker(w), k.cut(w), k.lru(w)]
    release = [k.engine_map(w), k.worker(w), k.cut(w), k.lru(w)]
    blocks48 = packed[:16] + "0" * 16 + packed[:16]
    return [
        ("record_chain", rec, [w, packed, NOW_US, NOW_US, "lots", 100], "capacity"),
        ("record_chain", rec, [w, packed + "abc", NOW_US, NOW_US, 0, 100], "chain"),
        ("evict_blocks", evict, [w, packed[:-16] + "zz" * 8, 0, 1], "blocks"),
        ("record_chain", rec, [w, packed, NOW_US, NOW_US, 0, 0], "limit"),
        ("record_chain", rec, ["a|b", packed, NOW_US, NOW_US, 0, 100], "worker"),
        ("record_chain", rec, [w, packed, 0, NOW_US, 0, 100], "now"),
        ("record_chain", rec, [w, packed, NOW_US, NOW_US - 1, 0, 100], "top"),
        ("evict_blocks", evict, [w, packed, 0, 7], "mark_holes"),
        ("correct_chain", evict, [w, packed[:-16] + "zz" * 8, 0, 0, 1], "blocks"),
        ("correct_chain", evict, [w, "", 0, 0, 1], "blocks"),
        ("correct_chain", evict, [w, packed, -5, 0, 1], "now"),
        ("correct_chain", evict, [w, packed, 0, -1, 1], "cut_us"),
        ("correct_chain", evict, [w, packed, 0, 0, 0], "limit"),
        ("store_engine_blocks", store, [w, blocks48, "01", 0, HOUR, 0, 100], "roots"),
        ("store_engine_blocks", store, [w, blocks48, "1", 0, -4, 0, 100], "ttl"),
        ("release_engine_blocks", release, [w, packed[:15], 0], "blocks"),
        ("acquire_lease", [k.leases, k.load], [w, "id", -2, 100, 0], "prefill_tokens"),
        ("acquire_lease", [k.leases, k.load], [w, "id", 2, 100, 0, "some"], "report"),
        ("release_lease", [k.leases, k.load], [w, "id", 0, "sometimes"], "mode"),
        (
            "lookup_chain",
            [k.worker_prefix, k.cut_prefix, k.load, k.head_prefix],
            [0, packed[:-1], ""],
            "chain",
        ),
    ]


async def test_lua_rejects_bad_arguments_and_writes_nothing(any_client: Any) -> None:
    """A script called directly with one bad argument raises a typed error naming it and
    leaves no half-written record: every argument is checked before the first write."""
    idx = ResidencyIndex(any_client)
    k = KeySchema().model(M)
    packed = "".join(f"{x:016x}" for x in chain(20))
    scripts = load_scripts()
    for name, keys, args, argument in _raw_calls(k, packed):
        s = scripts[name]
        call = ScriptCall(s, keys, args)
        with pytest.raises(ScriptArgumentError) as err:
            await idx.call(call)
        assert err.value.argument == argument, name
        assert err.value.code in set(ScriptErrorCode)
        for node_keys in [await any_client.keys("*")]:
            assert node_keys == [], f"{name} left {node_keys}"


def test_every_script_has_a_complete_header() -> None:
    pkg = resources.files("kvrouter.lua")
    names = [
        e.name for e in pkg.iterdir() if e.name.endswith(".lua") and not e.name.startswith("_")
    ]
    assert len(names) == len(load_scripts()) >= 9
    for name in names:
        text = (pkg / name).read_text()
        n_keys = int(re.match(r"[a-z_]+-(\d+)\.lua", name).group(1))  # type: ignore[union-attr]
        header = text[: text.index("]]")]
        documented = sorted(set(re.findall(r"KEYS\[(\d+)\]", header)))
        assert documented == [str(i) for i in range(1, n_keys + 1)], name
        assert "ARGV[1]" in header and "Returns" in header and "Errors" in header, name
        body = text[text.index("]]") :]
        used = {int(i) for i in re.findall(r"KEYS\[(\d+)\]", body)}
        assert used <= set(range(1, n_keys + 1)), name
        if name.startswith(("lookup", "resolve")):
            assert text.startswith("#!lua flags=no-writes"), name
        else:
            assert text.startswith("#!lua\n"), name


async def test_script_sha_is_what_redis_computes_and_is_computed_once(
    any_client: Any,
) -> None:
    for script in load_scripts().values():
        assert await any_client.script_load(script.source) == script.sha
        # A stored attribute, not a property hashing the source on every EVALSHA.
        assert not isinstance(getattr(type(script), "sha", None), property)


async def test_head_entries_follow_the_records(idx: ResidencyIndex, any_client: Any) -> None:
    """Head keys are bounded by the live records, not by their TTL: a trim, an expiry or a
    clear that removes a chain's records drops its head entries too."""
    k = KeySchema().model(M)
    chains = [chain(4, seed=500 + i) for i in range(30)]
    for i, c in enumerate(chains):
        await idx.record(M, "w", c, ttl_new_ms=HOUR, capacity=8, now_ms=T0 + i)
    # capacity 8 holds the last two 4-block chains; only their heads remain
    live = {f"{c[0]:016x}" for c in chains[-2:]}
    assert set(await any_client.zrange(k.worker_heads("w"), 0, -1)) == live
    for c in chains[:-2]:
        assert await any_client.exists(k.head(f"{c[0]:016x}")) == 0
    for c in chains[-2:]:
        assert (await idx.lookup(M, c, now_ms=T0 + 100)).depth("w") == 4
    # Expiry drops heads too (the next write for the worker sweeps what has expired).
    await idx.record(M, "w", chain(4, seed=999), ttl_new_ms=HOUR, now_ms=T0 + 2 * HOUR)
    assert await any_client.zrange(k.worker_heads("w"), 0, -1) == [f"{chain(4, seed=999)[0]:016x}"]
    # A clear drops every head of the worker, and other workers' entries stay.
    await idx.record(M, "w2", chains[0], ttl_new_ms=HOUR, now_ms=T0 + 2 * HOUR)
    await idx.record(M, "w", chains[0], ttl_new_ms=HOUR, now_ms=T0 + 2 * HOUR)
    await idx.clear_worker(M, "w")
    assert await any_client.exists(k.worker_heads("w")) == 0
    assert await any_client.zrange(k.head(f"{chains[0][0]:016x}"), 0, -1) == ["w2"]


async def test_trim_drops_the_least_recently_accessed_whatever_the_source(
    idx: ResidencyIndex,
) -> None:
    """At capacity, a block a router dispatched just now outlives one an engine confirmed an
    hour ago, although the confirmed record is valid for longer (issue #17, item 4)."""
    now = int(time.time() * 1000)
    old, new = chain(4, seed=100), chain(2, seed=200)
    confirmed = [EngineBlock(1000 + i, None if i == 0 else 999 + i, k) for i, k in enumerate(old)]
    # Confirmed an hour ago with a two-hour life: valid for another hour.
    await idx.store_engine_blocks(M, "w", confirmed, ttl_ms=2 * HOUR, now_ms=now - HOUR)
    # Dispatched now, speculative: valid for 30 s only, so lowest by valid-until.
    r = await idx.record(M, "w", new, ttl_new_ms=30_000, capacity=4)
    assert r.evicted == 2
    assert (await idx.lookup(M, new)).depth("w") == 2
    # The confirmed chain lost its tail (least recently accessed), not its head.
    assert (await idx.lookup(M, old)).depth("w") == 2
