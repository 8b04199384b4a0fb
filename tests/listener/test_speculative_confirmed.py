"""Speculative, then confirmed, end to end (issue #17 item 6): the official openai client
sends a completion through the router to a simulated vLLM worker whose KV events a listener
applies. The router's record at dispatch lives the speculative TTL; the engine's BlockStored
events confirm it (its life extended to the listener's record TTL). A worker whose engine
never confirms (no listener for its events) keeps only the speculative record, which expires
after the speculative TTL.

Loopback only; every wait is bounded; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import openai
import pytest

from eviction_listener.service import Listener
from eviction_listener.settings import ListenerSettings, parse_engines
from eviction_listener.testing import applied_seq
from kvrouter.index.hashing import BlockHasher
from kvrouter.index.keys import KeySchema
from kvrouter.index.scripts import ResidencyIndex
from kvrouter.sim.fleet import SimFleet
from kvrouter.sim.settings import SimSettings
from router_node.app import POOL, RouterServer
from router_node.settings import RouterSettings, WorkerSpec

pytestmark = pytest.mark.redis
MODEL = "sim-model"
B = 16
PROMPT = [(37 * i + 11) % 20_000 for i in range(B * 10 + 3)]
KEYS = BlockHasher(MODEL, B).keys(PROMPT)
SPECULATIVE_S = 2.0
CONFIRMED_S = 3600.0


async def valid_until_us(client: Any, worker: str) -> list[float]:
    """The valid-until score of each block of PROMPT's chain for `worker` (0: none)."""
    k = KeySchema().model(MODEL).worker(worker)
    scores = await client.zmscore(k, [f"{x:016x}" for x in KEYS])
    return [s or 0.0 for s in scores]


async def server_now_us(client: Any) -> int:
    sec, usec = await client.time()
    return int(sec) * 1_000_000 + int(usec)


async def test_dispatch_is_confirmed_by_the_engine_or_expires(
    redis_url: str, redis_client: Any
) -> None:
    sim = SimSettings(
        workers=2, capacity_tokens=B * 512, time_scale=200.0, base_port=0,
        kv_events_base_port=0, model=MODEL, kv_events="positional",
    )  # fmt: skip
    async with SimFleet(sim) as fleet:
        assert fleet.info is not None
        confirmed, unconfirmed = fleet.info.workers[0], fleet.info.workers[1]
        # The listener reads only the first worker's events: the second one's engine never
        # confirms anything the router records for it.
        listener = Listener(
            ListenerSettings(
                model=MODEL,
                redis_url=redis_url,
                block_size=B,
                metrics_port=0,
                metrics_host="127.0.0.1",
                lease_s=2.0,
                notices=False,
                record_ttl_s=CONFIRMED_S,
                engines=parse_engines(
                    f"{confirmed.id}={confirmed.events_endpoint},replay={confirmed.replay_endpoint}"
                ),
            )
        )
        await listener.start()
        routers = [
            RouterServer(
                RouterSettings(
                    host="127.0.0.1",
                    port=0,
                    redis_url=redis_url,
                    models=(MODEL,),
                    workers=(WorkerSpec.parse(f"{w.id}={w.url}"),),
                    health_interval_s=0,
                    models_interval_s=0.1,
                    kv_events=True,
                    speculative_ttl_s=SPECULATIVE_S,
                    admin_token="t",
                ),
                rng=random.Random(0),
            )
            for w in (confirmed, unconfirmed)
        ]
        for r in routers:
            await r.start()
        try:
            await listener.wait_ticked()
            loop = asyncio.get_running_loop()
            for r, w in zip(routers, (confirmed, unconfirmed), strict=True):
                deadline = loop.time() + 10
                while r.app[POOL].workers[w.id].listed is None:
                    assert loop.time() < deadline
                    await asyncio.sleep(0.02)
            for r in routers:
                client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="k", max_retries=0)
                done = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
                assert done.usage is not None and done.usage.prompt_tokens == len(PROMPT)
                await client.close()
            now = await server_now_us(redis_client)
            # Both workers hold the chain now: one confirmed, one on the dispatch record only.
            idx = ResidencyIndex(redis_client)
            deadline = loop.time() + 10
            while True:
                spec = await valid_until_us(redis_client, unconfirmed.id)
                conf = await valid_until_us(redis_client, confirmed.id)
                seq = await applied_seq(redis_client, MODEL, confirmed.id)
                # Confirmed: the engine's events extended every block's life to about the
                # listener's TTL, far past the speculative one.
                if seq is not None and min(conf) > now + 10 * SPECULATIVE_S * 1e6:
                    break
                assert loop.time() < deadline, f"never confirmed: {conf} at {now}"
                await asyncio.sleep(0.05)
            assert max(conf) <= now + (CONFIRMED_S + 60) * 1e6
            assert all(0 < s <= now + SPECULATIVE_S * 1e6 for s in spec), spec
            assert (await idx.lookup(MODEL, KEYS)).depths == {
                confirmed.id: len(KEYS),
                unconfirmed.id: len(KEYS),
            }
            # After the speculative TTL only the confirmed record is still matched.
            await asyncio.sleep(SPECULATIVE_S + 0.5)
            assert (await idx.lookup(MODEL, KEYS)).depths == {confirmed.id: len(KEYS)}
        finally:
            for r in routers:
                await r.close()
            await listener.close()
