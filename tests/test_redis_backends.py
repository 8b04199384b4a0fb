"""The test fixtures' Redis backends: the switch, and the container path where Docker runs."""

from __future__ import annotations

import pytest

from kvrouter.index.connection import connect
from kvrouter.index.scripts import ResidencyIndex
from tests.conftest import docker_unavailable, redis_backend, redis_container


def test_backend_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVR_TEST_REDIS", "process")
    assert redis_backend() == "process"
    monkeypatch.setenv("KVR_TEST_REDIS", "docker")
    assert redis_backend() == "docker"
    monkeypatch.setenv("KVR_TEST_REDIS", "auto")
    assert redis_backend() == ("process" if docker_unavailable() else "docker")
    monkeypatch.setenv("KVR_TEST_REDIS", "podman")
    with pytest.raises(pytest.UsageError, match="use auto, docker or process"):
        redis_backend()


async def test_index_on_a_redis_container() -> None:
    reason = docker_unavailable()
    if reason:
        pytest.skip(f"container backend not testable here: {reason}")
    with redis_container() as url:
        client = connect(url)
        idx = ResidencyIndex(client)
        await idx.load()
        await idx.record("m", "w1", list(range(1, 33)), ttl_new_ms=60_000)
        assert (await idx.lookup("m", list(range(1, 33)))).depths == {"w1": 32}
        await client.aclose()


def test_a_started_server_started_again_leaves_no_process_behind() -> None:
    # `with RedisServer().start() as r` starts twice: the second must not orphan the first.
    from kvrouter.redisproc import RedisServer

    server = RedisServer().start()
    first = server.proc
    assert first is not None
    try:
        with server as again:  # __enter__ starts it again
            assert again is server and server.proc is first and first.poll() is None
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
            pytest.fail("the first redis-server outlived close()")
