"""Shared fixtures: real Redis servers (standalone and a 3-master Cluster).

REDIS_URL / REDIS_CLUSTER_URL point the suite at servers you run yourself (their data is
flushed). Without them, the standalone server comes from one of two backends, chosen by
KVR_TEST_REDIS:

- `auto` (default): a container where a Docker engine answers, else a process;
- `docker`: a `redis` container started with testcontainers (fails if no engine answers);
- `process`: a `redis-server` process on a free loopback port.

The Cluster is always three `redis-server` processes: Cluster nodes announce their own
addresses, which from inside containers are not reachable from the host without host
networking. Without a redis-server binary, process-backed tests are skipped with a reason
that says how to install it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from kvrouter.index.connection import connect
from kvrouter.redisproc import INSTALL_HINT, RedisServer
from tests.support.clients import close_clients
from tests.support.redis_cluster import RedisClusterProcs

NO_REDIS = shutil.which("redis-server") is None and "REDIS_URL" not in os.environ
REDIS_IMAGE = os.environ.get("KVR_TEST_REDIS_IMAGE", "redis:7.2")


def docker_unavailable() -> str | None:
    """Why no Docker engine can be used here, or None when one answers a ping."""
    try:
        import docker
    except ImportError:
        return "the docker package is missing (pip install 'testcontainers[redis]')"
    try:
        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"no Docker engine answers ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def redis_backend() -> str:
    """`docker` or `process`, from KVR_TEST_REDIS (auto, docker or process)."""
    wanted = os.environ.get("KVR_TEST_REDIS", "auto")
    if wanted not in ("auto", "docker", "process"):
        raise pytest.UsageError(f"KVR_TEST_REDIS={wanted!r}: use auto, docker or process")
    if wanted == "auto":
        return "process" if docker_unavailable() else "docker"
    return wanted


@contextmanager
def redis_container(image: str = REDIS_IMAGE) -> Iterator[str]:
    """A Redis container from testcontainers; yields its URL as the host reaches it."""
    reason = docker_unavailable()
    if reason:
        raise RuntimeError(f"KVR_TEST_REDIS=docker, but {reason}")
    from testcontainers.redis import RedisContainer

    with RedisContainer(image) as container:
        host = container.get_container_host_ip()
        yield f"redis://{host}:{container.get_exposed_port(6379)}/0"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    if redis_backend() == "docker":
        with redis_container() as url:
            yield url
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


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    """Close the test's clients (`tests.support.clients.closed_after_test`) on its own loop."""
    yield
    await close_clients()
