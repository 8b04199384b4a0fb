"""ZmqEventSource against real pyzmq sockets on 127.0.0.1 speaking vLLM's wire format.

Every wait is bounded (a hang fails the test) but nothing asserts on durations. Each test
first handshakes (publish until received) to get past ZMQ's slow-joiner window.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgpack
import pytest

from eviction_listener.events import AllBlocksCleared, BlockRemoved, BlockStored
from eviction_listener.zmq_source import (
    Delivered,
    EngineEndpoint,
    Resync,
    SourceFailedError,
    SourceItem,
    ZmqEventSource,
    dp_worker_id,
    expand_dp_ranks,
    offset_endpoint,
)
from kvrouter.bench.vllm_wire import FIELDS_V0_9_0
from tests.support.vllm_publisher import VllmEventPublisher, free_tcp_port, handshake

MAX_WAIT = 15.0


def tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def summary(items: list[SourceItem]) -> list[tuple[Any, ...]]:
    """Items as comparable tuples: ("R", worker, reason) / ("D", worker, seq, replayed)."""
    return [
        ("R", i.worker_id, i.reason)
        if isinstance(i, Resync)
        else ("D", i.worker_id, i.seq, i.replayed)
        for i in items
    ]


async def take_until(
    src: ZmqEventSource, done: Callable[[list[SourceItem]], bool]
) -> list[SourceItem]:
    items: list[SourceItem] = []
    async with asyncio.timeout(MAX_WAIT):
        while not done(items):
            items += await src.get_many(1000)
    return items


def through(worker: str, seq: int) -> Callable[[list[SourceItem]], bool]:
    """Done once ``worker``'s batch ``seq`` has been delivered."""
    return lambda items: any(
        isinstance(i, Delivered) and i.worker_id == worker and i.seq == seq for i in items
    )


async def eventually(check: Callable[[], bool]) -> None:
    """Wait (bounded) for a counter the reader updates after handing over its last item, e.g.
    a replay's outcome, known only once the end marker follows the delivered batches."""
    async with asyncio.timeout(MAX_WAIT):
        # Polling on purpose: the counters have no event to await, and some live in the
        # publisher's replay thread.
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.fixture
def make_pub() -> Iterator[Callable[..., VllmEventPublisher]]:
    pubs: list[VllmEventPublisher] = []

    def make(*args: Any, **kwargs: Any) -> VllmEventPublisher:
        pub = VllmEventPublisher(*args, **kwargs)
        pubs.append(pub)
        return pub

    yield make
    for pub in pubs:
        pub.close()


@pytest.fixture
async def make_source() -> AsyncIterator[Callable[..., Any]]:
    sources: list[ZmqEventSource] = []

    async def make(endpoints: list[EngineEndpoint], **kwargs: Any) -> ZmqEventSource:
        kwargs.setdefault("replay_timeout", 5.0)
        src = ZmqEventSource(endpoints, **kwargs)
        sources.append(src)
        await src.start()
        return src

    yield make
    for src in sources:
        await src.close()


@pytest.fixture
def engine(
    make_pub: Callable[..., VllmEventPublisher], make_source: Callable[..., Any]
) -> Callable[..., Any]:
    """One engine with a replay socket, one source subscribed to it, handshake done."""

    async def start(
        replay: bool = True, source_kwargs: dict[str, Any] | None = None, **pub_kwargs: Any
    ) -> tuple[VllmEventPublisher, ZmqEventSource]:
        base = free_tcp_port(2)
        replay_ep = tcp(base + 1) if replay else None
        pub = make_pub(tcp(base), replay_ep, bind=True, **pub_kwargs)
        src = await make_source(
            [EngineEndpoint("w", tcp(base), replay_ep)], **(source_kwargs or {})
        )
        await handshake(pub, src, "w", max_wait=MAX_WAIT)
        return pub, src

    return start


@pytest.mark.parametrize(
    ("pub_kwargs"),
    [
        {},
        {"encoding": "map", "hash_format": "bytes"},
        {"hash_format": "i64", "fields": FIELDS_V0_9_0, "replay_topic_frame": False},
        {"envelope": "map", "hash_format": "bytes"},
    ],
    ids=["positional-u64", "map-bytes", "v0.9.0-i64", "map-envelope"],
)
async def test_delivers_each_event_kind_in_order(
    engine: Callable[..., Any], pub_kwargs: dict[str, Any]
) -> None:
    pub, src = await engine(**pub_kwargs)
    h1, h2 = (1 << 64) - 5, 1 << 63  # above 2**63: where u64 / i64 / bytes forms differ
    medium = None if pub_kwargs.get("fields") == FIELDS_V0_9_0 else "GPU"
    s1 = pub.stored([h1, h2], list(range(32)), medium=medium)
    s2 = pub.removed([h2], medium=medium)
    s3 = pub.cleared()
    items = await take_until(src, through("w", s3))
    assert summary(items) == [("D", "w", s, False) for s in (s1, s2, s3)]
    events = [e for i in items if isinstance(i, Delivered) for e in i.batch.events]
    stored, removed, cleared = events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == (h1, h2)
    assert stored.token_ids.tolist() == list(range(32))
    assert stored.block_size == 16
    assert removed == BlockRemoved((h2,), medium)
    assert cleared == AllBlocksCleared()
    assert src.last_seq("w") == s3


@pytest.mark.parametrize("replay_topic_frame", [True, False], ids=["after-45177", "before"])
async def test_gap_is_filled_by_replay(
    engine: Callable[..., Any], replay_topic_frame: bool
) -> None:
    pub, src = await engine(replay_topic_frame=replay_topic_frame)
    before = (src.stats.replays_ok, src.stats.gaps)
    a = pub.stored([1], lost=True)
    b = pub.stored([2], parent=1, lost=True)
    c = pub.removed([1])
    items = await take_until(src, through("w", c))
    assert summary(items) == [("D", "w", s, True) for s in (a, b, c)]
    assert [type(e) for i in items if isinstance(i, Delivered) for e in i.batch.events] == [
        BlockStored,
        BlockStored,
        BlockRemoved,
    ]
    await eventually(lambda: src.stats.replays_ok == before[0] + 1)
    assert src.stats.gaps == before[1] + 1


async def test_gap_beyond_replay_buffer_resyncs_then_continues(
    engine: Callable[..., Any],
) -> None:
    pub, src = await engine(buffer_steps=3)
    failed = src.stats.replays_failed
    first_lost = pub.last_seq + 1
    for h in range(5):
        pub.stored([h], lost=True)
    live = pub.cleared()
    items = await take_until(src, through("w", live))
    # The buffer holds only the last 3 seqs: clear the worker, then what is left, in order.
    assert summary(items) == [
        ("R", "w", "gap"),
        ("D", "w", live - 2, True),
        ("D", "w", live - 1, True),
        ("D", "w", live, True),
    ]
    assert live - 2 > first_lost
    await eventually(lambda: src.stats.replays_failed == failed + 1)


async def test_gap_without_replay_endpoint_resyncs(engine: Callable[..., Any]) -> None:
    pub, src = await engine(replay=False)
    pub.stored([1], lost=True)
    live = pub.stored([2])
    items = await take_until(src, through("w", live))
    assert summary(items) == [("R", "w", "gap"), ("D", "w", live, False)]


async def test_replay_timeout_resyncs(engine: Callable[..., Any]) -> None:
    pub, src = await engine(source_kwargs={"replay_timeout": 0.3})
    pub.replay_responds = False
    pub.stored([1], lost=True)
    live = pub.stored([2])
    items = await take_until(src, through("w", live))
    assert summary(items) == [("R", "w", "gap"), ("D", "w", live, False)]
    pub.replay_responds = True
    nxt = pub.cleared()
    assert summary(await take_until(src, through("w", nxt))) == [("D", "w", nxt, False)]


async def test_restart_resyncs_then_delivers_from_zero(engine: Callable[..., Any]) -> None:
    pub, src = await engine()
    restarts = src.stats.restarts
    pub.restart()
    s0 = pub.stored([7])
    items = await take_until(src, through("w", s0))
    assert s0 == 0
    assert summary(items) == [("R", "w", "restart"), ("D", "w", 0, False)]
    assert src.stats.restarts == restarts + 1


async def test_restart_with_lost_first_batch_recovers_from_replay(
    engine: Callable[..., Any],
) -> None:
    pub, src = await engine()
    # The stream before the restart must be past seq 1: when the handshake ends at seq 0, a
    # restart whose batch 0 is lost sends 1, which is the old stream going on (no restart can
    # be seen in the seqs). That made this test fail about 1 run in 5 under CPU load.
    while pub.last_seq < 3:
        pub.cleared()
    await take_until(src, through("w", pub.last_seq))
    pub.restart()
    pub.stored([7], lost=True)
    s1 = pub.stored([8], parent=7)
    items = await take_until(src, through("w", s1))
    assert summary(items) == [("R", "w", "restart"), ("D", "w", 0, True), ("D", "w", 1, True)]


async def test_live_copies_of_replayed_batches_are_dropped(engine: Callable[..., Any]) -> None:
    pub, src = await engine()
    dups = src.stats.duplicates
    # Published back to back before the source runs: the replay triggered by b already holds
    # c, so the live c that follows is a duplicate.
    a = pub.stored([1], lost=True)
    b = pub.stored([2])
    c = pub.stored([3])
    items = await take_until(src, through("w", c))
    d = pub.cleared()
    items += await take_until(src, through("w", d))
    assert summary(items) == [
        ("D", "w", a, True),
        ("D", "w", b, True),
        ("D", "w", c, True),
        ("D", "w", d, False),
    ]
    assert src.stats.duplicates == dups + 1


async def test_malformed_frames_and_payloads_are_counted_and_skipped(
    engine: Callable[..., Any],
) -> None:
    pub, src = await engine()
    stats = src.stats
    bad_frames, msgpack_errors, type_errors = (
        stats.bad_frames,
        stats.decode_errors["msgpack"],
        stats.decode_errors["type"],
    )
    pub.send_frames([b"only-one-frame"])
    pub.send_frames([b"", b"short", b"payload"])
    pub.send_frames([b"", (99).to_bytes(8, "big"), b"payload", b"extra"])
    pub.publish_payload(b"\xc1 not msgpack")
    pub.publish_payload(msgpack.packb([1.0, "not a list", 0]))
    good = pub.stored([5])
    items = await take_until(src, through("w", good))
    # The undecodable seqs are lost for good (their replay fails the same way): the worker
    # is cleared and delivery goes on.
    assert summary(items) == [("R", "w", "gap"), ("D", "w", good, True)]
    assert stats.bad_frames == bad_frames + 3
    assert stats.decode_errors["msgpack"] == msgpack_errors + 2  # live and replayed
    assert stats.decode_errors["type"] == type_errors + 2
    after = pub.cleared()
    assert summary(await take_until(src, through("w", after))) == [("D", "w", after, False)]


async def test_first_contact_replays_history_from_zero(
    make_pub: Callable[..., VllmEventPublisher], make_source: Callable[..., Any]
) -> None:
    base = free_tcp_port(2)
    pub = make_pub(tcp(base), tcp(base + 1), bind=True)
    for h in range(3):  # published before the listener existed
        pub.stored([h], lost=True)
    src = await make_source([EngineEndpoint("w", tcp(base), tcp(base + 1))])
    items = await handshake(pub, src, "w", max_wait=MAX_WAIT)
    assert summary(items)[:4] == [
        ("R", "w", "first_contact"),
        ("D", "w", 0, True),
        ("D", "w", 1, True),
        ("D", "w", 2, True),
    ]
    seqs = [i.seq for i in items if isinstance(i, Delivered)]
    assert seqs == list(range(len(seqs)))


async def test_resume_point_continues_without_resync(
    make_pub: Callable[..., VllmEventPublisher], make_source: Callable[..., Any]
) -> None:
    base = free_tcp_port(2)
    pub = make_pub(tcp(base), tcp(base + 1), bind=True)
    pub.skip(5)  # the engine is at seq 5; the index already reflects 0..4
    src = await make_source([EngineEndpoint("w", tcp(base), tcp(base + 1))], resume={"w": 4})
    items = await handshake(pub, src, "w", max_wait=MAX_WAIT)
    assert not any(isinstance(i, Resync) for i in items)
    seqs = [i.seq for i in items if isinstance(i, Delivered)]
    assert seqs == list(range(5, 5 + len(seqs)))


async def test_resume_point_ahead_of_engine_means_restart(
    make_pub: Callable[..., VllmEventPublisher], make_source: Callable[..., Any]
) -> None:
    base = free_tcp_port(2)
    pub = make_pub(tcp(base), tcp(base + 1), bind=True)
    src = ZmqEventSource([EngineEndpoint("w", tcp(base), tcp(base + 1))])
    src.set_resume("w", 100)
    await src.start()
    try:
        items = await handshake(pub, src, "w", max_wait=MAX_WAIT)
    finally:
        await src.close()
    assert summary(items)[0] == ("R", "w", "restart")
    seqs = [i.seq for i in items if isinstance(i, Delivered)]
    assert seqs == list(range(len(seqs)))


async def test_dp_rank_one_on_offset_port(
    make_pub: Callable[..., VllmEventPublisher], make_source: Callable[..., Any]
) -> None:
    base = free_tcp_port(4)  # PUB on base, base+1; ROUTER on base+2, base+3
    pubs = [make_pub(tcp(base), tcp(base + 2), dp_rank=r, bind=True) for r in (0, 1)]
    assert pubs[1].endpoint == tcp(base + 1)
    assert pubs[1].replay_endpoint == tcp(base + 3)
    src = await make_source(expand_dp_ranks(EngineEndpoint("eng", tcp(base), tcp(base + 2)), 2))
    for pub in pubs:
        await handshake(pub, src, "eng", max_wait=MAX_WAIT)
    lost = pubs[1].stored([11], lost=True)
    s1 = pubs[1].stored([12], parent=11)
    s0 = pubs[0].removed([1])
    items = await take_until(src, lambda it: through("eng#dp1", s1)(it) and through("eng", s0)(it))
    per_worker = {w: [x for x in summary(items) if x[1] == w] for w in ("eng", "eng#dp1")}
    assert per_worker == {
        "eng": [("D", "eng", s0, False)],
        "eng#dp1": [("D", "eng#dp1", lost, True), ("D", "eng#dp1", s1, True)],
    }
    by_worker = {i.worker_id: i for i in items if isinstance(i, Delivered)}
    assert by_worker["eng#dp1"].batch.dp_rank == 1
    assert by_worker["eng"].batch.dp_rank == 0


async def test_rank_mismatch_is_counted_and_dropped(
    make_pub: Callable[..., VllmEventPublisher], make_source: Callable[..., Any]
) -> None:
    base = free_tcp_port(2)
    # Misconfigured: a rank-1 publisher on the port the listener expects rank 0 on.
    pub = make_pub(tcp(base - 1), dp_rank=1, bind=True)
    assert pub.endpoint == tcp(base)
    src = await make_source(expand_dp_ranks(EngineEndpoint("eng", tcp(base)), 1))
    async with asyncio.timeout(MAX_WAIT):
        while src.stats.rank_mismatch == 0:
            pub.cleared()
            await asyncio.sleep(0.02)
    assert src.stats.batches == 0
    assert src.pending == 0


async def test_bind_mode_maps_topics_to_workers(
    make_pub: Callable[..., VllmEventPublisher], make_source: Callable[..., Any]
) -> None:
    base = free_tcp_port(2)
    replay_a = tcp(base + 1)
    src = await make_source(
        [
            EngineEndpoint("pod-a", tcp(base), replay_a, topic="kv@a", bind=True),
            EngineEndpoint("pod-b", tcp(base), topic="kv@b", bind=True),
        ]
    )
    # Engines dial the listener (vLLM connects when the endpoint has no wildcard).
    pa = make_pub(tcp(base), replay_a, topic="kv@a")
    pb = make_pub(tcp(base), topic="kv@b")
    await handshake(pa, src, "pod-a", max_wait=MAX_WAIT)
    await handshake(pb, src, "pod-b", max_wait=MAX_WAIT)
    lost = pa.stored([1], lost=True)
    sa = pa.stored([2], parent=1)
    sb = pb.removed([9])
    items = await take_until(src, lambda it: through("pod-a", sa)(it) and through("pod-b", sb)(it))
    assert sorted(summary(items)) == sorted(
        [("D", "pod-a", lost, True), ("D", "pod-a", sa, True), ("D", "pod-b", sb, False)]
    )
    # "kv@ab" passes ZMQ's prefix filter for "kv@a" but is not that engine.
    stray = make_pub(tcp(base), topic="kv@ab")
    async with asyncio.timeout(MAX_WAIT):
        while src.stats.unknown_topic == 0:
            stray.cleared()
            await asyncio.sleep(0.02)
    assert src.last_seq("pod-a") == sa


async def test_backpressure_bounds_the_queue_and_loses_nothing(
    engine: Callable[..., Any],
) -> None:
    pub, src = await engine(source_kwargs={"queue_size": 4})
    first = pub.last_seq + 1
    for h in range(200):
        pub.stored([h])
    await asyncio.sleep(0.2)  # give the reader time to hit the bound; not asserted on
    assert src.pending <= 4
    items = await take_until(src, through("w", pub.last_seq))
    assert summary(items) == [("D", "w", s, False) for s in range(first, pub.last_seq + 1)]


async def test_close_is_idempotent_and_ends_iteration(engine: Callable[..., Any]) -> None:
    _, src = await engine()
    waiter = asyncio.create_task(src.get_many())
    await asyncio.sleep(0)
    await src.close()
    await src.close()
    assert await asyncio.wait_for(waiter, MAX_WAIT) == []
    assert [i async for i in src] == []
    assert all(s.closed for s in src._sockets)
    assert src._ctx is not None and src._ctx.closed


async def test_close_during_replay_closes_the_dealer(engine: Callable[..., Any]) -> None:
    pub, src = await engine(source_kwargs={"replay_timeout": 60.0})
    pub.replay_responds = False
    requests = pub.replay_requests
    pub.stored([1], lost=True)
    pub.stored([2])
    await eventually(lambda: pub.replay_requests > requests)
    # term() of the owned context would block on a DEALER left open.
    await asyncio.wait_for(src.close(), MAX_WAIT)


async def test_queued_items_survive_close(engine: Callable[..., Any]) -> None:
    pub, src = await engine()
    s = pub.cleared()
    await eventually(lambda: src.pending > 0)
    await src.close()
    assert summary([i async for i in src]) == [("D", "w", s, False)]


async def test_reader_failure_surfaces_to_consumer(
    engine: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pub, src = await engine()

    async def boom(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(src, "_on_message", boom)
    pub.cleared()
    with pytest.raises(SourceFailedError):
        async with asyncio.timeout(MAX_WAIT):
            while True:
                await src.get_many()


# -- configuration -----------------------------------------------------------------------------


def test_offset_endpoint_follows_vllm() -> None:
    assert offset_endpoint("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset_endpoint("tcp://*:5557", 3) == "tcp://*:5560"
    assert offset_endpoint("tcp://[::1]:5557", 1) == "tcp://[::1]:5558"
    assert offset_endpoint("inproc://kv", 2) == "inproc://kv_dp2"
    assert offset_endpoint("ipc:///tmp/kv", 0) == "ipc:///tmp/kv"
    for bad in ("ipc:///tmp/kv", "tcp://host", "tcp://host:65535"):
        with pytest.raises(ValueError):
            offset_endpoint(bad, 1)


def test_expand_dp_ranks_and_worker_ids() -> None:
    eps = expand_dp_ranks(EngineEndpoint("e", "tcp://h:5557", "tcp://h:5600", "t"), 3)
    assert [(e.endpoint, e.replay_endpoint, e.dp_rank) for e in eps] == [
        ("tcp://h:5557", "tcp://h:5600", 0),
        ("tcp://h:5558", "tcp://h:5601", 1),
        ("tcp://h:5559", "tcp://h:5602", 2),
    ]
    assert {e.worker_id for e in eps} == {"e"}
    assert [dp_worker_id("e", r) for r in (0, 1, 12)] == ["e", "e#dp1", "e#dp12"]
    assert [e.dp_rank for e in expand_dp_ranks(eps[0], 2, first_rank=4)] == [4, 5]
    with pytest.raises(ValueError):
        expand_dp_ranks(eps[0], 0)


@pytest.mark.parametrize(
    "endpoints",
    [
        [],
        [EngineEndpoint("w", "tcp://a:1"), EngineEndpoint("w", "tcp://b:1")],
        [EngineEndpoint("w", "tcp://a:1"), EngineEndpoint("x", "tcp://a:1")],
        [
            EngineEndpoint("w", "tcp://*:1", topic="t", bind=True),
            EngineEndpoint("x", "tcp://*:1", topic="t", bind=True),
        ],
        [
            EngineEndpoint("w", "tcp://*:1", bind=True),
            EngineEndpoint("x", "tcp://*:1", topic="t", bind=True),
        ],
        [EngineEndpoint("w", "tcp://*:1", bind=True), EngineEndpoint("x", "tcp://*:1")],
    ],
    ids=["none", "worker-twice", "address-twice", "topic-twice", "catch-all-shared", "mixed"],
)
def test_ambiguous_configurations_are_rejected(endpoints: list[EngineEndpoint]) -> None:
    with pytest.raises(ValueError):
        ZmqEventSource(endpoints)


def test_endpoint_validation() -> None:
    with pytest.raises(ValueError):
        EngineEndpoint("", "tcp://a:1")
    with pytest.raises(ValueError):
        EngineEndpoint("w", "")
    with pytest.raises(ValueError):
        EngineEndpoint("w", "tcp://a:1", dp_rank=-1)
