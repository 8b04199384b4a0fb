"""The listener's Lua scripts on a real Redis (standalone and a 3-master Cluster):
apply_engine_events against the one-event-at-a-time scripts, stream positions, fencing and
ownership leases."""

from __future__ import annotations

import itertools
import random
import time
from typing import Any

import pytest

from kvrouter.index.errors import ScriptArgumentError
from kvrouter.index.keys import KeySchema
from kvrouter.index.scripts import (
    ALREADY_APPLIED,
    APPLIED,
    FENCED,
    EngineBlock,
    ResidencyIndex,
    pack_u64,
)

pytestmark = pytest.mark.redis
M = "model-a"
T0 = int(time.time() * 1000) + 86_400_000
HOUR = 3_600_000


@pytest.fixture
def idx(any_client: Any) -> ResidencyIndex:
    return ResidencyIndex(any_client)


def ops_of(events: list[tuple[Any, ...]]) -> tuple[str, str]:
    """("R", eh, rk) / ("S", eh, ph, rk) / ("D", eh) / ("C",) -> (ops, packed fields)."""
    ops = "".join(e[0] for e in events)
    return ops, pack_u64([f for e in events for f in e[1:]])


async def apply(
    idx: ResidencyIndex,
    worker: str,
    events: list[tuple[Any, ...]],
    *,
    seq: int,
    epoch: int = 1,
    model: str = M,
) -> Any:
    ops, fields = ops_of(events)
    return await idx.call(
        idx.apply_engine_events_call(
            model, worker, ops, fields, epoch=epoch, seq=seq, ttl_ms=HOUR, now_ms=T0
        )
    )


async def snapshot(client: Any, worker: str, model: str = M) -> tuple[Any, ...]:
    """What a worker holds: engine map, record members, hole members (scores aside)."""
    k = KeySchema().model(model)
    emap = await client.hgetall(k.engine_map(worker))
    wrk = await client.zrange(k.worker(worker), 0, -1)
    cut = await client.zrange(k.cut(worker), 0, -1)
    return dict(emap), sorted(wrk), sorted(cut)


async def test_chain_duplicates_holes_and_tail_first_removal(idx: ResidencyIndex) -> None:
    rk = [0xA0 + i for i in range(4)]
    chain = [("R", 100, rk[0])] + [("S", 100 + i, 99 + i, rk[i]) for i in range(1, 4)]
    r = await apply(idx, "w", chain, seq=0)
    assert (r.status, r.stored, r.added) == (APPLIED, 4, 4)
    assert (await idx.lookup(M, rk, now_ms=T0 + 1)).depth("w") == 4
    # A duplicate copy of block 3, then one removal: still resident.
    r = await apply(idx, "w", [("S", 103, 102, rk[3]), ("D", 103)], seq=1)
    assert (r.duplicates, r.released, r.removed) == (1, 1, 0)
    assert (await idx.lookup(M, rk, now_ms=T0 + 1)).depth("w") == 4
    # A middle block with a child: a hole, the match stops there; unknown hashes counted.
    r = await apply(idx, "w", [("D", 101), ("D", 555)], seq=2)
    assert (r.released, r.removed, r.unknown, r.holes) == (1, 1, 1, 1)
    assert (await idx.lookup(M, rk, now_ms=T0 + 1)).depth("w") == 1
    r = await apply(idx, "w", [("D", 103), ("D", 102)], seq=3)
    assert (r.removed, r.holes) == (2, 0)


async def test_children_are_never_newer_than_parents(idx: ResidencyIndex, any_client: Any) -> None:
    await apply(idx, "w", [("R", 1, 0x11)], seq=0)
    # Announced later, in another call: capped below the parent's score.
    await apply(idx, "w", [("S", 2, 1, 0x12), ("S", 3, 2, 0x13)], seq=1)
    k = KeySchema().model(M)
    scores = [await any_client.zscore(k.worker("w"), f"{x:016x}") for x in (0x11, 0x12, 0x13)]
    assert scores[0] > scores[1] > scores[2]


def _random_events(rng: random.Random, n: int) -> list[tuple[Any, ...]]:
    """A plausible engine stream: chains grown block by block, duplicates, removals (known,
    unknown, out of order) and the odd clear."""
    live: list[tuple[int, int]] = []  # (engine hash, router key) of stored blocks
    out: list[tuple[Any, ...]] = []
    for _ in range(n):
        x = rng.random()
        if x < 0.15 or not live:
            h = rng.getrandbits(20) + 1
            out.append(("R", h, h * 7))
            live.append((h, h * 7))
        elif x < 0.55:
            ph, _ = rng.choice(live)
            h = rng.getrandbits(20) + 1
            out.append(("S", h, ph, h * 7))
            live.append((h, h * 7))
        elif x < 0.65:
            h, rk = rng.choice(live)
            out.append(("S", h, rng.getrandbits(20), rk))
        elif x < 0.97:
            h = rng.choice(live)[0] if rng.random() < 0.9 else rng.getrandbits(20)
            out.append(("D", h))
        else:
            out.append(("C",))
    return out


async def _one_at_a_time(idx: ResidencyIndex, worker: str, events: list[tuple[Any, ...]]) -> None:
    for e in events:
        if e[0] == "C":
            await idx.clear_worker(M, worker)
        elif e[0] == "D":
            await idx.release_engine_blocks(M, worker, [e[1]], now_ms=T0)
        else:
            parent = None if e[0] == "R" else e[2]
            block = EngineBlock(e[1], parent, e[-1])
            await idx.store_engine_blocks(M, worker, [block], ttl_ms=HOUR, now_ms=T0)


@pytest.mark.parametrize("seed", range(4))
async def test_batched_equals_one_event_at_a_time(
    idx: ResidencyIndex, any_client: Any, seed: int
) -> None:
    events = _random_events(random.Random(seed), 300)
    await _one_at_a_time(idx, "slow", events)
    # The same stream in a few calls of random length.
    rng = random.Random(seed + 100)
    i, seq = 0, 0
    while i < len(events):
        j = i + rng.randint(1, 80)
        r = await apply(idx, "fast", events[i:j], seq=seq)
        assert r.status == APPLIED
        i, seq = j, seq + 1
    assert await snapshot(any_client, "fast") == await snapshot(any_client, "slow")


async def test_retry_is_skipped_and_clear_always_applies(
    idx: ResidencyIndex, any_client: Any
) -> None:
    first = [("R", 1, 0x11), ("S", 2, 1, 0x12)]
    assert (await apply(idx, "w", first, seq=7)).status == APPLIED
    before = await snapshot(any_client, "w")
    # The same call again (a retry after an unknown outcome) changes nothing.
    assert (await apply(idx, "w", first, seq=7)).status == ALREADY_APPLIED
    assert (await apply(idx, "w", [("D", 2)], seq=5)).status == ALREADY_APPLIED
    assert await snapshot(any_client, "w") == before
    # A clear resets the stream (an engine restart starts again at seq 0).
    r = await apply(idx, "w", [("C",), ("R", 9, 0x19)], seq=0)
    assert (r.status, r.clears, r.stored) == (APPLIED, 1, 1)
    emap, wrk, _ = await snapshot(any_client, "w")
    assert list(emap) == [f"{9:016x}"] and wrk == [f"{0x19:016x}"]
    k = KeySchema().model(M)
    assert await any_client.hget(k.listener_seq, "w") == "1:0"


async def test_claim_fences_older_epochs(idx: ResidencyIndex, any_client: Any) -> None:
    assert (await apply(idx, "w", [("R", 1, 0x11)], seq=3, epoch=10)).status == APPLIED
    claim = await idx.call(idx.claim_worker_call(M, "w", epoch=11, ttl_ms=HOUR))
    assert (claim.claimed, claim.seq) == (True, 3)
    before = await snapshot(any_client, "w")
    r = await apply(idx, "w", [("D", 1)], seq=4, epoch=10)
    assert r.status == FENCED
    assert await snapshot(any_client, "w") == before
    assert not (await idx.call(idx.claim_worker_call(M, "w", epoch=9, ttl_ms=HOUR))).claimed
    assert (await apply(idx, "w", [("D", 1)], seq=4, epoch=11)).removed == 1
    fresh = await idx.call(idx.claim_worker_call(M, "nobody", epoch=1, ttl_ms=HOUR))
    assert (fresh.claimed, fresh.seq) == (True, -1)


async def test_owner_lease(idx: ResidencyIndex, any_client: Any) -> None:
    a = await idx.call(idx.own_worker_call("w", "A", lease_ms=HOUR))
    assert a.held and a.owner == "A" and a.epoch > 0
    assert (await idx.call(idx.own_worker_call("w", "A", lease_ms=HOUR))).epoch == a.epoch
    b = await idx.call(idx.own_worker_call("w", "B", lease_ms=HOUR))
    assert (b.held, b.owner) == (False, "A")
    assert not (await idx.call(idx.own_worker_call("w", "B", release=True))).held
    assert (await idx.call(idx.own_worker_call("w", "A", release=True))).held
    await any_client.hset(KeySchema().listener_owner("w"), "ns:lora-x", 1)
    b = await idx.call(idx.own_worker_call("w", "B", lease_ms=HOUR))
    assert b.held and b.epoch > a.epoch and b.models == ("lora-x",)
    assert not (await idx.call(idx.own_worker_call("w", "A", lease_ms=HOUR))).held


async def test_bad_arguments_are_named_and_write_nothing(
    idx: ResidencyIndex, any_client: Any
) -> None:
    k = KeySchema().model(M)
    s = idx.scripts["apply_engine_events"]
    keys = [k.engine_map("w"), k.worker("w"), k.cut("w"), k.workers, k.head_prefix, k.listener_seq]
    keys.append(k.lru("w"))
    good = pack_u64([1, 2])
    cases = [
        (["w", "RX", good, 0, HOUR, 0, 10, 1, 0], "ops"),
        (["w", "RD", good, 0, HOUR, 0, 10, 1, 0], "fields"),
        (["w", "R", good[:-1] + "G", 0, HOUR, 0, 10, 1, 0], "fields"),
        (["w", "R", good, 0, HOUR, 0, 10, -2, 0], "epoch"),
        (["w", "R", good, 0, HOUR, 0, 10, 1, -2], "seq"),
        (["w", "R", good, 0, 0, 0, 10, 1, 0], "ttl"),
    ]
    from kvrouter.index.scripts import ScriptCall

    for args, name in cases:
        with pytest.raises(ScriptArgumentError) as err:
            await idx.call(ScriptCall(s, keys, list(args)))
        assert err.value.argument == name
    with pytest.raises(ScriptArgumentError, match="ops"):
        idx.apply_engine_events_call(M, "w", "Q", "", epoch=1, seq=0, ttl_ms=1)
    with pytest.raises(ScriptArgumentError, match="listener"):
        idx.own_worker_call("w", "has space")
    assert await any_client.keys("*") == []


def _long_run(n: int, seed: int = 3) -> list[tuple[Any, ...]]:
    """A run of engine events: chains of stores, removals of their tails, a second chain."""
    rng = random.Random(seed)
    events: list[tuple[Any, ...]] = []
    eh = 1000
    for _ in range(n):
        length = rng.randint(2, 9)
        chain = list(range(eh, eh + length))
        eh += length
        events.append(("R", chain[0], rng.getrandbits(64)))
        events += [("S", h, p, rng.getrandbits(64)) for p, h in itertools.pairwise(chain)]
        events += [("D", h) for h in reversed(chain[rng.randint(1, length - 1) :])]
    return events


async def _apply_cut(
    idx: ResidencyIndex,
    worker: str,
    events: list[tuple[Any, ...]],
    size: int,
    *,
    epoch: int,
    base: int,
    seq: int,
    stop_after: int | None = None,
) -> list[int]:
    """`events` as one run cut into calls of `size` ops; the statuses (stops early to model a
    crash)."""
    out = []
    cuts = list(range(0, len(events), size))
    for k, start in enumerate(cuts):
        if stop_after is not None and k == stop_after:
            break
        ops, fields = ops_of(events[start : start + size])
        r = await idx.call(
            idx.apply_engine_events_call(
                M,
                worker,
                ops,
                fields,
                epoch=epoch,
                seq=seq,
                ttl_ms=HOUR,
                now_ms=T0,
                base=base,
                offset=start,
                final=k == len(cuts) - 1,
            )
        )
        out.append(r.status)
    return out


async def test_sub_batches_resume_after_a_crash_without_double_applying(
    idx: ResidencyIndex, any_client: Any
) -> None:
    """A long run applied in bounded calls: cut off after two calls, retried, then replayed
    whole by a new owner cut differently, it ends exactly where the run applied in one call
    does (engine map reference counts would show any op applied twice)."""
    # A clear part way: the engine restarted its cache; replays must not redo it wrongly.
    events = [*_long_run(6), ("C",), *_long_run(6, seed=4)]
    assert len(events) > 60 and events.index(("C",)) > 32
    await apply(idx, "ref", events, seq=5)

    assert await _apply_cut(idx, "w", events, 16, epoch=1, base=-1, seq=5, stop_after=2) == [
        APPLIED,
        APPLIED,
    ]
    lseq = KeySchema().model(M).listener_seq
    assert await any_client.hget(lseq, "w") == "1:-1:32"
    # The second call again (an unknown outcome retried): skipped, nothing written.
    before = await snapshot(any_client, "w")
    ops, fields = ops_of(events[16:32])
    r = await idx.call(
        idx.apply_engine_events_call(
            M,
            "w",
            ops,
            fields,
            epoch=1,
            seq=5,
            ttl_ms=HOUR,
            now_ms=T0,
            base=-1,
            offset=16,
            final=False,
        )
    )
    assert r.status == ALREADY_APPLIED
    assert await snapshot(any_client, "w") == before

    # A new owner claims (the partial position survives) and replays the run cut by 7.
    claim = await idx.call(idx.claim_worker_call(M, "w", epoch=2, ttl_ms=HOUR))
    assert (claim.claimed, claim.seq) == (True, -1)
    assert await any_client.hget(lseq, "w") == "2:-1:32"
    statuses = await _apply_cut(idx, "w", events, 7, epoch=2, base=-1, seq=5)
    assert statuses[:4] == [ALREADY_APPLIED] * 4 and set(statuses[4:]) == {APPLIED}
    assert await any_client.hget(lseq, "w") == "2:5"
    assert await snapshot(any_client, "w") == await snapshot(any_client, "ref")
    # Replayed once more after it finished: every call skipped.
    assert set(await _apply_cut(idx, "w", events, 10, epoch=2, base=-1, seq=5)) == {ALREADY_APPLIED}
    assert await snapshot(any_client, "w") == await snapshot(any_client, "ref")
