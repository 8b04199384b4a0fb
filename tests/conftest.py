"""Shared fixtures: real redis-server processes (standalone and a 3-master Cluster).

REDIS_URL / REDIS_CLUSTER_URL point the suite at servers you run yourself (their data is
flushed). Without them, servers are started on free loopback ports. Without a redis-server
binary, Redis tests are skipped with a reason that says how to install it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from kvrouter.index.connection import connect
from kvrouter.redisproc import INSTALL_HINT, RedisClusterProcs, RedisServer

NO_REDIS = shutil.which("redis-server") is None and "REDIS_URL" not in os.environ


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    if NO_REDIS:
        pytest.skip(f"no redis-server on PATH: {INSTALL_HINT}, or set REDIS_URL")
    # The binary exists: a server that will not start is an error, never a skip.
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    if os.environ.get("REDIS_CLUSTER_URL"):
        yield os.environ["REDIS_CLUSTER_URL"]
        return
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip(f"no redis-server/redis-cli on PATH: {INSTALL_HINT}")
    with RedisClusterProcs(masters=3) as cluster:
        yield cluster.url


async def _fresh(client: Any) -> None:
    await client.flushall()
    await client.script_flush()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Any]:
    """A client on the standalone server, its data and script cache flushed."""
    client = connect(redis_url)
    await _fresh(client)
    yield client
    await client.aclose()


@pytest.fixture
async def cluster_client(redis_cluster_url: str) -> AsyncIterator[Any]:
    """A client on the 3-master Cluster, every primary flushed."""
    client = connect(redis_cluster_url)
    await _fresh(client)
    yield client
    await client.aclose()


@pytest.fixture(params=["standalone", "cluster"])
async def any_client(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Runs a test once on the standalone server and once on the 3-master Cluster."""
    url = request.getfixturevalue(
        "redis_url" if request.param == "standalone" else "redis_cluster_url"
    )
    client = connect(url)
    await _fresh(client)
    yield client
    await client.aclose()
