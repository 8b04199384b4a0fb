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
