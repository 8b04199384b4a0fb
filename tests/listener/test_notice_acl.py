"""Notices a worker cannot forge: each worker publishes on its own channel as a Redis ACL user
allowed nothing else (eviction_listener.notices.worker_acl_rules), and the listener refuses a
notice whose worker is not its channel's. Two such users on a real redis-server: one worker's
forged notices for the other are refused by Redis (other channels) or by the listener (its own
channel), and the other worker's residency is untouched."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis.exceptions import NoPermissionError

from eviction_listener.notices import encode_notice, publish_notice, worker_acl_rules
from eviction_listener.service import Listener
from eviction_listener.settings import ListenerSettings
from kvrouter.index.connection import connect
from kvrouter.index.hashing import BlockHasher
from kvrouter.index.keys import KeySchema
from kvrouter.index.scripts import ResidencyIndex

pytestmark = pytest.mark.redis

M = "llama-acl"
B = 16
TOKENS = list(range(5 * B + 3))


@pytest.fixture
async def listener(redis_url: str, redis_client: Any) -> AsyncIterator[Listener]:
    s = ListenerSettings(
        model=M, redis_url=redis_url, block_size=B, metrics_port=0, metrics_host="127.0.0.1"
    )
    lst = Listener(s)
    await lst.start()
    await lst.wait_ticked()
    yield lst
    await lst.close()


@pytest.fixture
async def worker_users(redis_url: str, redis_client: Any) -> AsyncIterator[dict[str, Any]]:
    """A client per worker, each logged in as its own ACL user."""
    clients = {}
    parts = urlsplit(redis_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    for w in ("w1", "w2"):
        rules = worker_acl_rules([M], w)
        await redis_client.execute_command(
            "ACL", "SETUSER", f"notices-{w}", "reset", "on", f">pw-{w}", *rules
        )
        url = urlunsplit((parts.scheme, f"notices-{w}:pw-{w}@{host}", parts.path, "", ""))
        clients[w] = connect(url)
    yield clients
    for w, c in clients.items():
        await c.aclose()
        await redis_client.execute_command("ACL", "DELUSER", f"notices-{w}")


async def _until(check: Any) -> None:
    deadline = time.monotonic() + 15
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_worker_cannot_speak_for_another(
    listener: Listener, worker_users: dict[str, Any], redis_client: Any
) -> None:
    keys = BlockHasher(M, B).keys(TOKENS)
    idx = ResidencyIndex(redis_client)
    w1 = worker_users["w1"]
    k = KeySchema().model(M)

    async def depth(worker: str) -> int:
        return (await idx.lookup(M, keys)).depth(worker)

    async def w1_stored() -> bool:
        await publish_notice(w1, M, "store", "w1", tokens=TOKENS, own_channel=True)
        return await depth("w1") == 5

    await _until(w1_stored)  # the subscription may lag the listener's start

    # 1. Redis refuses w1's notice for w2 on w2's channel, and on the model-wide channel.
    for channel in (k.worker_notices("w2"), k.notices):
        with pytest.raises(NoPermissionError):
            await w1.execute_command("PUBLISH", channel, encode_notice("clear", "w2"))
    with pytest.raises(NoPermissionError):
        await w1.execute_command("ZADD", k.worker("w2"), 1, "00" * 8)
    # 2. On its own channel Redis lets it through; the listener refuses a notice for w2.
    forged = encode_notice("store", "w2", tokens=TOKENS)
    assert await w1.execute_command("PUBLISH", k.worker_notices("w1"), forged) == 1
    # w1's next own notice is applied after the forged one (one connection, in order).
    await publish_notice(w1, M, "evict", "w1", tokens=TOKENS, from_block=4, own_channel=True)

    async def w1_evicted() -> bool:
        return await depth("w1") == 4

    await _until(w1_evicted)
    assert await depth("w2") == 0
    assert listener.metrics.notice_errors["channel"] == 1
    # 3. w2 speaks for itself on its own channel as its own user.
    await publish_notice(worker_users["w2"], M, "store", "w2", keys=keys[:2], own_channel=True)

    async def w2_stored() -> bool:
        return await depth("w2") == 2

    await _until(w2_stored)
    assert await depth("w1") == 4
    assert listener.metrics.notice_errors["channel"] == 1
