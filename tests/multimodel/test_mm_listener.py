"""Router and listener agree on adapters: an engine KV event carrying ``lora_name`` (written by
the listener under the adapter's namespace, the adapter folded into the root) is exactly what
the router's lookup for that adapter finds, on the worker that sent it, and nothing else.

Real pieces throughout: a vLLM-format ZMQ publisher, the listener service, the router over
the same Redis, fake workers that list their models (adapters with their parent)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from eviction_listener.service import Listener
from eviction_listener.settings import ListenerSettings, parse_engines
from router_node.app import POOL, RouterServer
from router_node.settings import RouterSettings, WorkerSpec
from tests.support.fake_worker import FakeWorker, route_depths
from tests.support.vllm_publisher import (
    VllmEventPublisher,
    free_tcp_port,
    sync_listener,
    wait_applied,
)

pytestmark = pytest.mark.redis

BASE, SQL, CHAT = "llama", "sql-lora", "chat-lora"
B = 16
SEED = "fleet-a"
ADMIN = "t"
TOKENS = [(13 * i + 5) % 30_000 for i in range(B * 6)]


def eh(i: int, salt: int = 0) -> int:
    return (1 << 63) + 1000 * salt + i


@pytest.fixture
async def setup(
    redis_url: str, redis_client: Any
) -> AsyncIterator[tuple[RouterServer, list[FakeWorker], list[VllmEventPublisher]]]:
    ws = [
        FakeWorker(model=BASE, model_list=(BASE, SQL, CHAT), adapters={SQL: BASE, CHAT: BASE}),
        FakeWorker(model=BASE, model_list=(BASE, SQL, CHAT), adapters={SQL: BASE, CHAT: BASE}),
    ]
    for w in ws:
        await w.start()
    pubs, engines = [], []
    for w in ws:
        port = free_tcp_port(2)
        pubs.append(
            VllmEventPublisher(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}", bind=True)
        )
        engines.append(f"{w.id}=tcp://127.0.0.1:{port},replay=tcp://127.0.0.1:{port + 1}")
    listener = Listener(
        ListenerSettings(
            model=BASE,
            redis_url=redis_url,
            block_size=B,
            hash_seed=SEED,
            engines=tuple(e for x in engines for e in parse_engines(x)),
            metrics_port=0,
            metrics_host="127.0.0.1",
            lease_s=2.0,
            notices=False,
        )
    )
    await listener.start()
    await listener.wait_ticked()
    for pub, w in zip(pubs, ws, strict=True):
        await sync_listener(pub, redis_client, BASE, w.id)
    router = RouterServer(
        RouterSettings(
            host="127.0.0.1",
            port=0,
            redis_url=redis_url,
            models=(BASE,),
            workers=tuple(WorkerSpec.parse(w.url) for w in ws),
            health_interval_s=0,
            models_interval_s=0.1,
            kv_events=True,
            block_size=B,
            hash_seed=SEED,
            admin_token=ADMIN,
            # The publishers' events describe caches the fake workers never computed (they
            # report 0 cached tokens): feedback would rightly drop what the events stored.
            feedback_heal=False,
        ),
        rng=random.Random(1),
    )
    await router.start()
    deadline = asyncio.get_running_loop().time() + 10
    while any(w.listed is None for w in router.app[POOL].workers.values()):
        assert asyncio.get_running_loop().time() < deadline, "workers never polled"
        await asyncio.sleep(0.02)
    yield router, ws, pubs
    await router.close()
    await listener.close()
    for p in pubs:
        p.close()
    for w in ws:
        await w.stop()


async def depths(router: RouterServer, model: str, ids: list[int]) -> dict[str, int]:
    return await route_depths(router.url, model, ids, ADMIN)


async def test_an_adapter_event_is_found_by_the_routers_lookup_for_that_adapter(
    setup: tuple[RouterServer, list[FakeWorker], list[VllmEventPublisher]], redis_client: Any
) -> None:
    router, ws, pubs = setup
    # Worker 1's engine reports 4 blocks computed under sql-lora (a prefill, then a decode
    # block chained from it: the chain continues across events).
    pubs[1].stored([eh(i, 1) for i in range(3)], TOKENS[: 3 * B], lora_name=SQL)
    s = pubs[1].stored([eh(3, 1)], TOKENS[3 * B : 4 * B], parent=eh(2, 1), lora_name=SQL)
    await wait_applied(redis_client, SQL, ws[1].id, s)
    ids = TOKENS[: 4 * B + 3]
    assert await depths(router, SQL, ids) == {ws[0].id: 0, ws[1].id: 4}
    # The same tokens under the other adapter, or the base model, match nothing.
    assert set((await depths(router, CHAT, ids)).values()) == {0}
    assert set((await depths(router, BASE, ids)).values()) == {0}
    # A request goes where the engine said the blocks are.
    async with (
        aiohttp.ClientSession() as s_,
        s_.post(router.url + "/v1/completions", json={"model": SQL, "prompt": ids}) as r,
    ):
        assert r.status == 200
        assert r.headers["x-kvrouter-worker"] == ws[1].id
        assert r.headers["x-kvrouter-matched-tokens"] == str(4 * B)
    # A base-model event on worker 0 is found by base-model lookups only.
    s = pubs[0].stored([eh(i, 2) for i in range(2)], TOKENS[: 2 * B])
    await wait_applied(redis_client, BASE, ws[0].id, s)
    assert (await depths(router, BASE, ids))[ws[0].id] == 2
    assert (await depths(router, CHAT, ids))[ws[0].id] == 0
    # Removal (BlockRemoved names no adapter): the listener finds the adapter namespace.
    s = pubs[1].removed([eh(3, 1)])
    await wait_applied(redis_client, SQL, ws[1].id, s)
    assert (await depths(router, SQL, ids))[ws[1].id] == 3
