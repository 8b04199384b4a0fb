"""`kvrouter register` as a process: the worker appears in the registry (with its KV-event
endpoints for listeners), stays while it heartbeats, and is gone after SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from eviction_listener.discovery import RedisRegistryDiscovery
from kvrouter.index.keys import KeySchema
from router_node.registry import read_registry

pytestmark = pytest.mark.redis
STEP = 20.0


def sidecar(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kvrouter", "register"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


async def registered(client: Any) -> dict[str, Any]:
    workers = await read_registry(client, KeySchema("kvr"), max_age_ms=60_000)
    return {w.id: w for w in workers}


async def test_registers_heartbeats_and_deregisters_on_sigterm(
    redis_url: str, redis_client: Any
) -> None:
    proc = sidecar(
        {
            "KVR_REDIS_URL": redis_url,
            "KVR_MODEL": "llama",
            "KVR_REGISTER_URL": "http://10.1.2.3:8000",
            "KVR_REGISTER_EVENTS": "tcp://10.1.2.3:5557",
            "KVR_REGISTER_REPLAY": "tcp://10.1.2.3:5558",
            "KVR_REGISTER_HEARTBEAT_S": "0.2",
        }
    )
    try:
        deadline = time.monotonic() + STEP
        while "10.1.2.3:8000" not in await registered(redis_client):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        w = (await registered(redis_client))["10.1.2.3:8000"]
        assert (w.url, w.models) == ("http://10.1.2.3:8000", ("llama",))
        first = w.heartbeat_ms
        while (await registered(redis_client))["10.1.2.3:8000"].heartbeat_ms == first:
            assert time.monotonic() < deadline, "no second heartbeat"
            await asyncio.sleep(0.05)
        # A listener with registry discovery finds its KV-event endpoints.
        engines = await RedisRegistryDiscovery(redis_client, KeySchema("kvr"), "llama").engines()
        assert [(e.worker_id, e.endpoint, e.replay_endpoint) for e in engines] == [
            ("10.1.2.3:8000", "tcp://10.1.2.3:5557", "tcp://10.1.2.3:5558")
        ]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STEP) == 0, proc.communicate()
        assert await registered(redis_client) == {}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_missing_url_stops_with_status_2() -> None:
    proc = sidecar({"KVR_MODEL": "llama"})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "KVR_REGISTER_URL" in err and "Traceback" not in err


async def test_relays_an_engine_restart_as_a_clear_notice(
    redis_url: str, redis_client: Any, tmp_path: Any
) -> None:
    """The restart relay end to end: the sidecar and `kvrouter listen` as processes, a worker
    whose health endpoint goes down and comes back; its records are cleared then, not while
    it stays up."""
    from aiohttp import web

    from eviction_listener.notices import publish_notice
    from kvrouter.index.hashing import BlockHasher
    from kvrouter.index.scripts import ResidencyIndex
    from tests.support.vllm_publisher import free_tcp_port

    model, block = "llama", 16
    up = {"value": True}
    probes: list[bool] = []

    async def health(_: web.Request) -> web.Response:
        probes.append(up["value"])
        return web.Response(status=200 if up["value"] else 503)

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_tcp_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    worker = f"127.0.0.1:{port}"
    tokens = list(range(5 * block))
    keys = BlockHasher(model, block).keys(tokens)

    async def depth() -> int:
        return (await ResidencyIndex(redis_client).lookup(model, keys)).depth(worker)

    base = {"KVR_REDIS_URL": redis_url, "KVR_MODEL": model, "KVR_BLOCK_SIZE": str(block)}
    listen_log = (tmp_path / "listen.log").open("w")
    listener = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter", "listen",
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **base,
             "KVR_METRICS_HOST": "127.0.0.1", "KVR_METRICS_PORT": str(free_tcp_port())},
        stdout=listen_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    proc = sidecar(
        {
            **base,
            "KVR_REGISTER_URL": f"http://{worker}",
            "KVR_REGISTER_HEARTBEAT_S": "0.1",
            "KVR_REGISTER_RELAY_RESTARTS": "true",
        }
    )
    try:
        # The worker's blocks, as notices put them (publish until the listener hears).
        deadline = time.monotonic() + STEP
        while not (
            await publish_notice(redis_client, model, "store", worker, tokens=tokens) > 0
            and await depth() == 5
        ):
            assert listener.returncode is None and proc.poll() is None
            assert time.monotonic() < deadline, "the listener never applied a notice"
            await asyncio.sleep(0.05)
        # Up all along: several probes, nothing cleared.
        seen = len(probes)
        while len(probes) < seen + 5:
            assert time.monotonic() < deadline, "the sidecar does not probe"
            await asyncio.sleep(0.05)
        assert await depth() == 5
        # Down for a few probes (the engine restarting), then up: cleared.
        up["value"] = False
        seen = len(probes)
        while len(probes) < seen + 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await depth() == 5  # down alone clears nothing: the routers' health check acts
        up["value"] = True
        while await depth() != 0:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the restart was not relayed"
            await asyncio.sleep(0.05)
    finally:
        for p in (proc,):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=STEP)
        if listener.returncode is None:
            listener.terminate()
            await listener.wait()
        listen_log.close()
        await runner.cleanup()
    _, err = proc.communicate()
    assert "is up again: cleared its records of llama" in err, err
