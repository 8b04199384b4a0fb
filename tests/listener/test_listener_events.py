"""The listener end to end: real-format vLLM batches from a pyzmq PUB (with a replay ROUTER)
into Redis, checked through the router's own lookup over its own block keys of the same tokens.

Loopback only; every wait is bounded; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from eviction_listener.events import BlockStored
from eviction_listener.service import Listener
from eviction_listener.settings import ListenerSettings, parse_engines
from kvrouter.index.hashing import BlockHasher
from kvrouter.index.keys import KeySchema
from kvrouter.index.scripts import ResidencyIndex
from tests.support.metrics import parse
from tests.support.vllm_publisher import (
    VllmEventPublisher,
    free_tcp_port,
    sync_listener,
    wait_applied,
)

pytestmark = pytest.mark.redis
M = "llama-test"
B = 16
TOKENS = [(7 * i + 3) % 50_000 for i in range(B * 12)]
HASHER = BlockHasher(M, B)


def tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def eh(i: int, salt: int = 0) -> int:
    """Engine hash of block i (above 2**63, where the u64 / bytes forms differ)."""
    return (1 << 63) + 1000 * salt + i


async def depth(client: Any, worker: str, n_tokens: int, **hash_kw: Any) -> int:
    model = hash_kw.get("lora_name") or M
    keys = HASHER.keys(TOKENS[:n_tokens], **hash_kw)
    return (await ResidencyIndex(client).lookup(model, keys)).depth(worker)


@pytest.fixture
def make_pub() -> Iterator[Callable[..., VllmEventPublisher]]:
    pubs: list[VllmEventPublisher] = []

    def make(*args: Any, **kwargs: Any) -> VllmEventPublisher:
        pub = VllmEventPublisher(*args, **kwargs)
        pubs.append(pub)
        return pub

    yield make
    for p in pubs:
        p.close()


@pytest.fixture
async def make_listener(redis_url: str, redis_client: Any) -> AsyncIterator[Callable[..., Any]]:
    listeners: list[Listener] = []

    async def make(engines: list[str], **kw: Any) -> Listener:
        kw.setdefault("metrics_port", 0)
        kw.setdefault("metrics_host", "127.0.0.1")
        kw.setdefault("lease_s", 2.0)
        kw.setdefault("notices", False)
        s = ListenerSettings(
            model=M,
            redis_url=redis_url,
            block_size=B,
            engines=tuple(e for x in engines for e in parse_engines(x)),
            **kw,
        )
        lst = Listener(s)
        listeners.append(lst)
        await lst.start()
        await lst.wait_ticked()
        return lst

    yield make
    for lst in listeners:
        await lst.close()


@pytest.fixture
async def engine(
    make_pub: Callable[..., VllmEventPublisher],
    make_listener: Callable[..., Any],
    redis_client: Any,
) -> Callable[..., Any]:
    """One engine "w" with a replay socket, a listener on it, synced."""

    async def start(**pub_kw: Any) -> tuple[VllmEventPublisher, Listener]:
        base = free_tcp_port(2)
        pub = make_pub(tcp(base), tcp(base + 1), bind=True, **pub_kw)
        lst = await make_listener([f"w={tcp(base)},replay={tcp(base + 1)}"])
        await sync_listener(pub, redis_client, M, "w")
        return pub, lst

    return start


@pytest.mark.parametrize(
    "pub_kw",
    [{}, {"encoding": "map", "hash_format": "bytes"}],
    ids=["positional-u64", "map-bytes"],
)
async def test_stores_duplicates_removals_and_clear(
    engine: Callable[..., Any], redis_client: Any, pub_kw: dict[str, Any]
) -> None:
    pub, _ = await engine(**pub_kw)
    # A 4-block prefill, then a decode block chained from its last block.
    pub.stored([eh(i) for i in range(4)], TOKENS[: 4 * B])
    pub.stored([eh(4)], TOKENS[4 * B : 5 * B], parent=eh(3))
    # A duplicate physical copy of block 4 (vLLM does not de-duplicate).
    s = pub.stored([eh(4)], TOKENS[4 * B : 5 * B], parent=eh(3))
    await wait_applied(redis_client, M, "w", s)
    assert await depth(redis_client, "w", 5 * B) == 5
    s = pub.removed([eh(4)])
    await wait_applied(redis_client, M, "w", s)
    assert await depth(redis_client, "w", 5 * B) == 5  # the other copy is still there
    s = pub.removed([eh(4)])
    await wait_applied(redis_client, M, "w", s)
    assert await depth(redis_client, "w", 5 * B) == 4
    s = pub.removed([eh(3), eh(2)])  # tail first, as engines evict
    await wait_applied(redis_client, M, "w", s)
    assert await depth(redis_client, "w", 5 * B) == 2
    s = pub.cleared()
    await wait_applied(redis_client, M, "w", s)
    assert await depth(redis_client, "w", 5 * B) == 0


async def test_gap_is_replayed(engine: Callable[..., Any], redis_client: Any) -> None:
    pub, lst = await engine()
    pub.stored([eh(i) for i in range(3)], TOKENS[: 3 * B], lost=True)
    s = pub.stored([eh(3)], TOKENS[3 * B : 4 * B], parent=eh(2))
    await wait_applied(redis_client, M, "w", s)
    assert await depth(redis_client, "w", 4 * B) == 4
    assert sum(st.gaps for st in lst.source_stats()) >= 1


async def test_unfillable_gap_clears_the_worker(
    engine: Callable[..., Any], redis_client: Any
) -> None:
    pub, lst = await engine()
    s = pub.stored([eh(i) for i in range(3)], TOKENS[: 3 * B])
    await wait_applied(redis_client, M, "w", s)
    pub.skip(3)  # lost and not in the replay buffer: the index can no longer vouch for w
    s = pub.stored([eh(i, 1) for i in range(2)], TOKENS[B : 3 * B])
    await wait_applied(redis_client, M, "w", s)
    assert await depth(redis_client, "w", 3 * B) == 0
    assert lst.metrics.clears["resync"] >= 1


async def test_engine_restart_clears_then_follows_the_new_stream(
    engine: Callable[..., Any], redis_client: Any
) -> None:
    pub, _ = await engine()
    s = pub.stored([eh(i) for i in range(4)], TOKENS[: 4 * B])
    await wait_applied(redis_client, M, "w", s)
    pub.restart()
    s = pub.stored([eh(i, 2) for i in range(2)], TOKENS[: 2 * B])
    assert s == 0
    await wait_applied(redis_client, M, "w", s)
    # The old incarnation's blocks 2-3 are gone; the new one holds 2 blocks.
    assert await depth(redis_client, "w", 4 * B) == 2


async def test_dp_rank_one_is_its_own_worker(
    make_pub: Callable[..., VllmEventPublisher],
    make_listener: Callable[..., Any],
    redis_client: Any,
) -> None:
    base = free_tcp_port(4)
    pubs = [make_pub(tcp(base), tcp(base + 2), dp_rank=r, bind=True) for r in (0, 1)]
    await make_listener([f"eng={tcp(base)},replay={tcp(base + 2)},dp=2"])
    await sync_listener(pubs[0], redis_client, M, "eng")
    await sync_listener(pubs[1], redis_client, M, "eng#dp1")
    pubs[1].stored([eh(i) for i in range(2)], TOKENS[: 2 * B], lost=True)
    s = pubs[1].stored([eh(2)], TOKENS[2 * B : 3 * B], parent=eh(1))
    await wait_applied(redis_client, M, "eng#dp1", s)
    assert await depth(redis_client, "eng#dp1", 3 * B) == 3
    assert await depth(redis_client, "eng", 3 * B) == 0


async def test_what_is_not_indexed(engine: Callable[..., Any], redis_client: Any) -> None:
    pub, lst = await engine()
    skipped = lst.metrics.skipped_blocks
    # A medium that cannot name a tier key (CPU and other media are indexed per tier:
    # test_offloaded_blocks_are_indexed_per_tier).
    pub.stored([eh(i) for i in range(2)], TOKENS[: 2 * B], medium="nvme/0")
    pub.stored([eh(9)], TOKENS[:8], block_size=8)  # an SGLang partial page
    pub.stored([eh(20)], TOKENS[B : 2 * B], parent=12345)  # parent never seen: orphan
    s = pub.stored([eh(i, 3) for i in range(2)], TOKENS[: 4 * B], block_size=2 * B)
    await wait_applied(redis_client, M, "w", s)
    assert await depth(redis_client, "w", 4 * B) == 0
    assert skipped["medium"] == 2 and skipped["partial_page"] == 1
    assert skipped["orphan"] == 1 and skipped["block_size_mismatch"] == 2


async def test_engine_blocks_of_several_router_blocks(
    make_pub: Callable[..., VllmEventPublisher],
    make_listener: Callable[..., Any],
    redis_client: Any,
) -> None:
    base = free_tcp_port(2)
    pub = make_pub(tcp(base), tcp(base + 1), bind=True)
    await make_listener([f"w={tcp(base)},replay={tcp(base + 1)},block={2 * B}"])
    await sync_listener(pub, redis_client, M, "w")
    pub.stored([eh(0), eh(1)], TOKENS[: 4 * B], block_size=2 * B)
    s = pub.stored([eh(2)], TOKENS[4 * B : 6 * B], parent=eh(1), block_size=2 * B)
    await wait_applied(redis_client, M, "w", s)
    assert await depth(redis_client, "w", 6 * B) == 6
    s = pub.removed([eh(2)])
    await wait_applied(redis_client, M, "w", s)
    assert await depth(redis_client, "w", 6 * B) == 4


async def test_lora_blocks_live_in_the_adapter_namespace(
    engine: Callable[..., Any], redis_client: Any
) -> None:
    pub, _ = await engine()
    pub.stored([eh(0, 4), eh(1, 4)], TOKENS[: 2 * B], lora_name="alice")
    s = pub.stored([eh(2, 4)], TOKENS[2 * B : 3 * B], parent=eh(1, 4), lora_name="alice")
    await wait_applied(redis_client, "alice", "w", s)
    assert await depth(redis_client, "w", 3 * B, lora_name="alice") == 3
    assert await depth(redis_client, "w", 3 * B) == 0
    s = pub.removed([eh(2, 4)])
    await wait_applied(redis_client, "alice", "w", s)
    assert await depth(redis_client, "w", 3 * B, lora_name="alice") == 2
    owner = await redis_client.hgetall(KeySchema().listener_owner("w"))
    assert "ns:alice" in owner


async def test_event_with_extra_keys_beyond_lora_is_skipped(
    engine: Callable[..., Any], redis_client: Any
) -> None:
    from array import array

    pub, lst = await engine()
    ev = BlockStored(
        (eh(0, 5),), None, array("I", TOKENS[:B]), B, medium="GPU", extra_keys=((("img-1", 0),),)
    )
    # (A lone string in a first block's extra keys is vLLM's cache salt: indexed, see
    # test_speculative_confirmed.py; a multimodal item as (identifier, offset) is not.)
    s = pub.publish([ev])
    await wait_applied(redis_client, M, "w", s)
    assert await depth(redis_client, "w", B) == 0
    assert lst.metrics.skipped_blocks["extra_keys"] == 1


async def test_metrics_health_ready_and_bad_input(
    engine: Callable[..., Any], redis_client: Any
) -> None:
    import aiohttp

    pub, lst = await engine()
    pub.publish_payload(b"\xc1 not msgpack")
    pub.send_frames([b"only-one-frame"])
    s = pub.stored([eh(i) for i in range(2)], TOKENS[: 2 * B])
    await wait_applied(redis_client, M, "w", s)
    # The undecodable batch's seq is a gap no replay can fill: the worker was cleared, then
    # what followed was applied; the process keeps going.
    assert await depth(redis_client, "w", 2 * B) == 2
    assert lst.metrics.clears["resync"] >= 1
    base = f"http://127.0.0.1:{lst.metrics_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
        async with http.get(base + "/health") as r:
            assert r.status == 200
        async with http.get(base + "/ready") as r:
            assert r.status == 200 and (await r.json())["owned_workers"] == 1
    m = parse(text)
    assert m.value("kvr_listener_errors_total", kind="decode_msgpack") >= 1
    assert m.value("kvr_listener_errors_total", kind="bad_frames") >= 1
    assert m.value("kvr_listener_blocks_total", op="stored") >= 2
    assert m.value("kvr_listener_resyncs_total", reason="gap") >= 1
    assert m.value("kvr_listener_owned_workers") == 1
    assert m.has("kvr_listener_lag_seconds")
    assert m.types["kvr_listener_flush_seconds_total"] == "counter"
    assert m.types["kvr_listener_lag_seconds"] == "gauge"


async def test_a_worker_dropped_as_the_listener_closes_leaves_no_socket_open(
    engine: Callable[..., Any],
) -> None:
    """`close()` cancels the ownership tick; when that lands while the tick drops a worker
    (its slice deleted, its lease lost), the worker is already out of the owned set, so only
    the drop can close its source. Its sockets must be closed anyway: one left open made the
    context's term() block the loop forever (seen in CI as a 300 s timeout at shutdown)."""
    _, lst = await engine()
    source = lst._owned["w"].source
    drop = asyncio.ensure_future(lst._drop("w"))
    await asyncio.sleep(0)  # popped from the owned set, waiting for its pump to stop
    assert "w" not in lst.owned_workers and not drop.done()
    drop.cancel()
    await asyncio.gather(drop, return_exceptions=True)
    assert source._sockets and all(sock.closed for sock in source._sockets)
    await asyncio.wait_for(lst.close(), 10)


@pytest.mark.cluster
async def test_on_a_redis_cluster_with_notices(
    make_pub: Callable[..., VllmEventPublisher], redis_cluster_url: str, cluster_client: Any
) -> None:
    from eviction_listener.notices import publish_notice

    base = free_tcp_port(2)
    pub = make_pub(tcp(base), tcp(base + 1), bind=True)
    url = redis_cluster_url.replace("redis://", "redis+cluster://", 1)
    s = ListenerSettings(
        model=M,
        redis_url=url,
        block_size=B,
        engines=parse_engines(f"w={tcp(base)},replay={tcp(base + 1)}"),
        metrics_port=0,
        metrics_host="127.0.0.1",
    )
    async with Listener(s) as lst:
        await lst.wait_ticked()
        await sync_listener(pub, cluster_client, M, "w")
        pub.stored([eh(i) for i in range(3)], TOKENS[: 3 * B], lost=True)
        s1 = pub.stored([eh(3)], TOKENS[3 * B : 4 * B], parent=eh(2))
        await wait_applied(cluster_client, M, "w", s1)
        assert await depth(cluster_client, "w", 4 * B) == 4
        keys = HASHER.keys(TOKENS[: 2 * B])
        for _ in range(300):  # until the subscription is in place
            await publish_notice(cluster_client, M, "store", "side", keys=keys)
            if await depth(cluster_client, "side", 2 * B) == 2:
                break
            await asyncio.sleep(0.05)
        assert await depth(cluster_client, "side", 2 * B) == 2


def test_vllm_cache_salt_is_read_from_the_first_blocks_extra_keys() -> None:
    from eviction_listener.applier import _NOT_INDEXABLE, _extras_salt

    assert _extras_salt((None, None), None, True) is None
    assert _extras_salt((("s1",), None), None, True) == "s1"
    assert _extras_salt((("alice", "s1"), ("alice",)), "alice", True) == "s1"
    assert _extras_salt((("alice",), ("alice",)), "alice", False) is None
    # Only a chain's first block carries the salt; anything else is not foldable.
    assert _extras_salt((("s1",),), None, False) is _NOT_INDEXABLE
    assert _extras_salt((None, ("s1",)), None, True) is _NOT_INDEXABLE
    assert _extras_salt((("s1", "mm-2"),), None, True) is _NOT_INDEXABLE
    assert _extras_salt(((("mm-1", 0),),), None, True) is _NOT_INDEXABLE


@pytest.mark.parametrize(
    "pub_kw",
    [{}, {"encoding": "map", "hash_format": "bytes"}],
    ids=["positional-u64", "map-bytes"],
)
async def test_offloaded_blocks_are_indexed_per_tier(
    engine: Callable[..., Any], redis_client: Any, pub_kw: dict[str, Any]
) -> None:
    """#17 item 7: vLLM's CPU offloading publishes BlockStored(medium="CPU") with the GPU
    block's hashes and no tokens; the block is indexed on the worker's CPU tier, a GPU
    eviction leaves it there, and a removal on CPU drops the CPU record only."""
    pub, lst = await engine(**pub_kw)
    idx = ResidencyIndex(redis_client)
    keys = HASHER.keys(TOKENS[: 6 * B])
    pub.stored([eh(i) for i in range(6)], TOKENS[: 6 * B])
    # The offload: hashes only, as the CPU connector sends them.
    pub.publish([BlockStored(tuple(eh(i) for i in range(6)), None, array("I"), B, medium="CPU")])
    s = pub.removed([eh(5), eh(4), eh(3)])  # the GPU evicts the tail
    await wait_applied(redis_client, M, "w", s)
    res = await idx.lookup_with_tiers(M, keys, ["CPU"], ["w"])
    assert res.depth("w") == 3
    assert res.tier_depths("w") == {"CPU": 3}
    s = pub.removed([eh(5)], medium="CPU")  # the CPU tier drops the chain's tail
    await wait_applied(redis_client, M, "w", s)
    res = await idx.lookup_with_tiers(M, keys, ["CPU"], ["w"])
    assert res.depth("w") == 3
    assert res.tiers["CPU"]["w"] == (3, 2)
    assert res.tier_depths("w") == {"CPU": 2}
    assert lst.metrics.tier_blocks == {"stored": 6, "removed": 1}
    # A store on a tier with tokens (a connector that sends them) needs no GPU event first.
    more = HASHER.keys(TOKENS[: 8 * B])
    s = pub.stored([eh(6), eh(7)], TOKENS[6 * B : 8 * B], parent=eh(5), medium="CPU")
    await wait_applied(redis_client, M, "w", s)
    tier_key = KeySchema().model(M).tier("CPU", "w")
    held = await redis_client.zmscore(tier_key, [f"{k:016x}" for k in more])
    assert [s is not None for s in held] == [True] * 5 + [False] + [True] * 2


async def test_unfillable_gap_clears_the_tiers_too(
    engine: Callable[..., Any], redis_client: Any
) -> None:
    pub, lst = await engine()
    idx = ResidencyIndex(redis_client)
    keys = HASHER.keys(TOKENS[: 3 * B])
    pub.stored([eh(i) for i in range(3)], TOKENS[: 3 * B])
    s = pub.stored([eh(i) for i in range(3)], TOKENS[: 3 * B], medium="CPU")
    await wait_applied(redis_client, M, "w", s)
    tier_key = KeySchema().model(M).tier("CPU", "w")
    assert await redis_client.zcard(tier_key) == 3
    pub.skip(3)  # removals on the tier may be among the lost batches
    s = pub.stored([eh(i, 1) for i in range(2)], TOKENS[B : 3 * B])
    await wait_applied(redis_client, M, "w", s)
    assert lst.metrics.clears["resync"] >= 1
    assert await redis_client.zcard(tier_key) == 0
    assert (await idx.lookup_with_tiers(M, keys, ["CPU"], ["w"])).tiers == {}
