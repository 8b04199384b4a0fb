"""The simulator as a multi-model worker: a base model and LoRA adapters on one engine, each
caching its own blocks, listed on /v1/models with their parent, and KV events that name the
adapter, which the listener indexes under the adapter and the router then finds."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from eviction_listener.service import Listener
from eviction_listener.settings import ListenerSettings, parse_engines
from kvrouter.index.keys import KeySchema
from kvrouter.sim.events import BlockStored, decode_batch, encode_batch
from kvrouter.sim.fleet import SimFleet
from kvrouter.sim.settings import SettingsError, SimSettings
from router_node.app import POOL, RouterServer
from router_node.settings import RouterSettings, WorkerSpec
from tests.support.vllm_publisher import applied_seq

BASE, A, B = "sim-base", "lora-a", "lora-b"
PROMPT = [(31 * i + 7) % 20_000 for i in range(16 * 10 + 3)]


def sim_settings(**kw: Any) -> SimSettings:
    return SimSettings(
        workers=1, capacity_tokens=16 * 512, time_scale=200.0, base_port=0,
        kv_events_base_port=0, model=BASE, lora_adapters=f"{A}, {B}", **kw,
    )  # fmt: skip


async def complete(http: aiohttp.ClientSession, url: str, model: str) -> tuple[int, Any]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 2}
    async with http.post(url + "/v1/completions", json=body) as r:
        return r.status, await r.json()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


async def test_adapters_are_listed_with_their_parent_and_cache_apart(
    http: aiohttp.ClientSession,
) -> None:
    async with SimFleet(sim_settings()) as fleet:
        assert fleet.info is not None
        url = fleet.info.workers[0].url
        async with http.get(url + "/v1/models") as r:
            cards = {m["id"]: m["parent"] for m in (await r.json())["data"]}
        assert cards == {BASE: None, A: BASE, B: BASE}
        for model in (BASE, A, B):  # the same prompt: a miss under each model
            status, body = await complete(http, url, model)
            assert status == 200 and body["model"] == model
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        for model in (BASE, A, B):  # and a hit under each, on its own blocks
            _, body = await complete(http, url, model)
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 160
        status, body = await complete(http, url, "lora-c")
        assert status == 404 and "lora-c" in body["error"]["message"]


def test_adapter_settings_and_event_encoding() -> None:
    assert sim_settings().adapters == (A, B)
    with pytest.raises(SettingsError, match="lora-adapters"):
        SimSettings(model=BASE, lora_adapters=BASE)
    ev = BlockStored([1, 2], None, list(range(32)), 16, lora_name=A)
    for enc in ("positional", "map"):
        _, events, _ = decode_batch(encode_batch(1.0, [ev], enc))  # type: ignore[arg-type]
        assert events == [ev]


@pytest.mark.redis
async def test_the_listener_indexes_sim_adapter_events_where_the_router_looks(
    redis_url: str, redis_client: Any, http: aiohttp.ClientSession
) -> None:
    async with SimFleet(sim_settings(kv_events="positional")) as fleet:
        assert fleet.info is not None
        w = fleet.info.workers[0]
        listener = Listener(
            ListenerSettings(
                model=BASE,
                redis_url=redis_url,
                block_size=16,
                metrics_port=0,
                metrics_host="127.0.0.1",
                lease_s=2.0,
                notices=False,
                engines=parse_engines(f"{w.id}={w.events_endpoint},replay={w.replay_endpoint}"),
            )
        )
        await listener.start()
        router = RouterServer(
            RouterSettings(
                host="127.0.0.1",
                port=0,
                redis_url=redis_url,
                models=(BASE,),
                workers=(WorkerSpec.parse(f"{w.id}={w.url}"),),
                health_interval_s=0,
                models_interval_s=0.1,
                kv_events=True,
                admin_token="t",
            ),
            rng=random.Random(0),
        )
        await router.start()
        try:
            await listener.wait_ticked()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while router.app[POOL].workers[w.id].listed is None:
                assert loop.time() < deadline
                await asyncio.sleep(0.02)
            # The router learned the adapters from the worker: it serves them.
            async with http.get(router.url + "/v1/models") as r:
                assert {m["id"] for m in (await r.json())["data"]} == {BASE, A, B}
            status, _ = await complete(http, router.url, A)
            assert status == 200
            # The engine's events for adapter A land in A's namespace (the listener's own
            # keys: the engine-hash map and its stream position), not in the base model's.
            emap_a = KeySchema().model(A).engine_map(w.id)
            deadline = loop.time() + 10
            while not await redis_client.exists(emap_a):
                assert loop.time() < deadline, "no adapter events were applied"
                await asyncio.sleep(0.05)
            assert await applied_seq(redis_client, A, w.id) is not None
            assert not await redis_client.exists(KeySchema().model(B).engine_map(w.id))
            assert not await redis_client.exists(KeySchema().model(BASE).engine_map(w.id))
        finally:
            await router.close()
            await listener.close()
