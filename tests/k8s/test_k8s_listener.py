"""`kvrouter listen --discovery kubernetes`: engines from the EndpointSlices the routers watch.

The fake API server of test_k8s_discovery serves the slices; two engines publish real vLLM
KV events on loopback ZMQ sockets, and the index in a real Redis shows which the listener
applied. An engine whose slice appears while the listener runs is owned and applied; one
whose slice goes away is released, without a restart.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web

from eviction_listener.discovery import engine_from_endpoint
from eviction_listener.service import Listener
from eviction_listener.settings import ListenerSettings
from kvrouter.discovery.base import Endpoint
from kvrouter.index.hashing import BlockHasher
from kvrouter.index.scripts import ResidencyIndex
from tests.k8s.test_k8s_discovery import NS, SELECTOR, FakeApiServer, endpoint, eslice
from tests.support.vllm_publisher import VllmEventPublisher, free_tcp_port, sync_listener

pytestmark = pytest.mark.redis
M = "llama-k8s"
B = 16
TOKENS = list(range(100, 100 + 4 * B))
STEP = 15.0


class ProxiedFakeApi(FakeApiServer):
    """The fake API as reached through `kubectl proxy`: the proxy adds the credentials, so a
    listener given only ``KVR_K8S_API_URL`` is let in."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = {**request.headers, "Authorization": f"Bearer {self.token}"}
        return await super().handle(request.clone(headers=headers))


def engine_slice(name: str, pod: str, events: int, replay: int) -> dict[str, Any]:
    # Port names as the chart's values name them (discovery.kubernetes.*PortName).
    return eslice(
        name,
        [endpoint("127.0.0.1", pod)],
        ports={"http": 8000, "kv-events": events, "kv-replay": replay},
    )


@pytest.fixture
def engines() -> Iterator[list[tuple[VllmEventPublisher, int]]]:
    pubs: list[tuple[VllmEventPublisher, int]] = []
    for _ in range(2):
        base = free_tcp_port(2)
        pub = VllmEventPublisher(
            f"tcp://127.0.0.1:{base}", f"tcp://127.0.0.1:{base + 1}", bind=True
        )
        pubs.append((pub, base))
    yield pubs
    for pub, _ in pubs:
        pub.close()


@pytest.fixture
async def api() -> AsyncIterator[ProxiedFakeApi]:
    async with ProxiedFakeApi() as server:
        yield server


async def until(predicate: Any) -> None:
    async with asyncio.timeout(STEP):
        while not predicate():  # noqa: ASYNC110 - polls the listener's state, bounded
            await asyncio.sleep(0.02)


def listener_env(api: ProxiedFakeApi, redis_url: str, *, metrics_port: int) -> dict[str, str]:
    """The listener's KVR_* settings for the fake API's EndpointSlices (as the chart renders
    them, the API reached through a proxy URL)."""
    return {
        "KVR_MODEL": M,
        "KVR_REDIS_URL": redis_url,
        "KVR_BLOCK_SIZE": str(B),
        "KVR_DISCOVERY": "kubernetes",
        "KVR_K8S_API_URL": api.url,
        "KVR_K8S_NAMESPACE": NS,
        "KVR_K8S_SELECTOR": SELECTOR,
        "KVR_METRICS_HOST": "127.0.0.1",
        "KVR_METRICS_PORT": str(metrics_port),
        "KVR_LEASE_S": "2",
        "KVR_NOTICES": "false",
    }


async def depth(client: Any, worker: str) -> int:
    keys = BlockHasher(M, B).keys(TOKENS)
    return (await ResidencyIndex(client).lookup(M, keys)).depth(worker)


async def test_engines_added_and_removed_while_running(
    api: ProxiedFakeApi,
    engines: list[tuple[VllmEventPublisher, int]],
    redis_url: str,
    redis_client: Any,
) -> None:
    (pub_a, port_a), (pub_b, port_b) = engines
    api.put(engine_slice("vllm-a", "vllm-0", port_a, port_a + 1))
    settings = ListenerSettings.from_env(listener_env(api, redis_url, metrics_port=0))
    async with Listener(settings) as listener:
        await listener.wait_ticked()
        assert listener.owned_workers == ["vllm-0:8000"]
        await sync_listener(pub_a, redis_client, M, "vllm-0:8000")
        seq = pub_a.stored([(1 << 63) + i for i in range(4)], TOKENS)
        await sync_listener(pub_a, redis_client, M, "vllm-0:8000")
        assert pub_a.last_seq > seq and await depth(redis_client, "vllm-0:8000") == 4

        # A new engine's slice: owned without a restart, its events applied.
        api.put(engine_slice("vllm-b", "vllm-1", port_b, port_b + 1))
        await until(lambda: "vllm-1:8000" in listener.owned_workers)
        await sync_listener(pub_b, redis_client, M, "vllm-1:8000")
        pub_b.stored([(1 << 62) + i for i in range(2)], TOKENS[: 2 * B])
        await sync_listener(pub_b, redis_client, M, "vllm-1:8000")
        assert await depth(redis_client, "vllm-1:8000") == 2

        # The first engine's slice goes away: released.
        api.delete("vllm-a")
        await until(lambda: listener.owned_workers == ["vllm-1:8000"])


def test_endpoint_to_engine_keeps_ranks_and_skips_engines_without_events() -> None:
    rank1 = Endpoint("vllm-0:8000#dp1", "http://h:8000", "tcp://h:5558", "tcp://h:5560", dp_rank=1)
    spec = engine_from_endpoint(rank1)
    assert spec is not None and spec.worker_ids() == ["vllm-0:8000#dp1"]
    assert [e.endpoint for e in spec.endpoints()] == ["tcp://h:5558"]
    assert engine_from_endpoint(Endpoint("w:8000", "http://h:8000")) is None


def test_kubernetes_outside_a_pod_stops_with_status_2() -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "KVR_MODEL": M,
        "KVR_DISCOVERY": "kubernetes",
        "KVR_K8S_SELECTOR": SELECTOR,
        "KVR_K8S_NAMESPACE": NS,
    }
    res = subprocess.run(
        [sys.executable, "-m", "kvrouter", "listen"],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "KUBERNETES_SERVICE_HOST" in res.stderr and "Traceback" not in res.stderr


async def test_listener_logs_in_with_the_charts_password_variable() -> None:
    # The chart's bundled Redis runs with --requirepass and hands the password to both
    # processes as KVR_REDIS_PASSWORD, never in the URL.
    from kvrouter.redisproc import RedisServer

    password = "chart-Pw/with:odd@chars"
    with RedisServer(args=("--requirepass", password)) as server:
        env = {
            "KVR_MODEL": M,
            "KVR_REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
            "KVR_METRICS_HOST": "127.0.0.1",
            "KVR_METRICS_PORT": "0",
            "KVR_NOTICES": "false",
        }
        async with Listener(
            ListenerSettings.from_env({**env, "KVR_REDIS_PASSWORD": password})
        ) as listener:
            await listener.wait_ticked()
            assert listener.ready
        from redis.exceptions import AuthenticationError, ResponseError

        with pytest.raises((AuthenticationError, ResponseError)):
            async with Listener(ListenerSettings.from_env(env)):
                pass


async def _owned(metrics_url: str) -> float:
    import aiohttp

    from tests.support.metrics import parse

    async with aiohttp.ClientSession() as s, s.get(metrics_url) as r:
        return parse(await r.text()).value("kvrouter_listener_owned_workers")


async def _until_async(predicate: Any, proc: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(STEP):
        while True:
            assert proc.returncode is None, "kvrouter listen exited"
            try:
                if await predicate():
                    return
            except (OSError, KeyError):
                pass  # not listening yet, or the gauge not exported yet
            await asyncio.sleep(0.05)


async def test_listen_process_follows_engines_coming_and_going(
    api: ProxiedFakeApi,
    engines: list[tuple[VllmEventPublisher, int]],
    redis_url: str,
    redis_client: Any,
    tmp_path: Any,
) -> None:
    """The same as above, with the listener run as the chart runs it: `kvrouter listen` as a
    process, configured only through its environment (discovery kubernetes, the API reached
    through a proxy URL, the port names of the chart's values)."""
    (pub_a, port_a), (pub_b, port_b) = engines
    api.put(engine_slice("vllm-a", "vllm-0", port_a, port_a + 1))
    metrics_port = free_tcp_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **listener_env(api, redis_url, metrics_port=metrics_port),
        "KVR_K8S_EVENTS_PORT_NAME": "kv-events",
        "KVR_K8S_REPLAY_PORT_NAME": "kv-replay",
    }
    log = (tmp_path / "listen.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter", "listen",
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        await _until_async(lambda: _wait_owned(metrics_url, 1), proc)
        await sync_listener(pub_a, redis_client, M, "vllm-0:8000")
        pub_a.stored([(1 << 63) + i for i in range(4)], TOKENS)
        await sync_listener(pub_a, redis_client, M, "vllm-0:8000")
        assert await depth(redis_client, "vllm-0:8000") == 4

        # A new engine's slice while the process runs: owned, its events applied.
        api.put(engine_slice("vllm-b", "vllm-1", port_b, port_b + 1))
        await _until_async(lambda: _wait_owned(metrics_url, 2), proc)
        await sync_listener(pub_b, redis_client, M, "vllm-1:8000")
        pub_b.stored([(1 << 62) + i for i in range(2)], TOKENS[: 2 * B])
        await sync_listener(pub_b, redis_client, M, "vllm-1:8000")
        assert await depth(redis_client, "vllm-1:8000") == 2

        # The first engine's slice goes away: released (its lease ended at once, not left to
        # expire), and its later events are no longer applied.
        api.delete("vllm-a")
        await _until_async(lambda: _wait_owned(metrics_url, 1), proc)
        assert await redis_client.hget("kvr:listener:owner:vllm-0:8000", "until") == "0"
        pub_a.removed([(1 << 63) + i for i in range(4)])
        await sync_listener(pub_b, redis_client, M, "vllm-1:8000")
        assert await depth(redis_client, "vllm-0:8000") == 4
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            log.close()
    assert proc.returncode == 0, (tmp_path / "listen.log").read_text()


async def _wait_owned(metrics_url: str, n: int) -> bool:
    return await _owned(metrics_url) == n
