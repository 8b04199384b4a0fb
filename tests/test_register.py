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
