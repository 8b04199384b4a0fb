"""Redis URLs: every documented form, bad ones rejected with a reason, secrets redacted."""

from __future__ import annotations

import socket

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from kvrouter.index.connection import RedisURLError, connect, redact_url
from kvrouter.redisproc import free_ports


def test_standalone_and_tls_urls() -> None:
    c = connect("redis://user:s3cret@10.1.2.3:6380/2")
    assert isinstance(c, Redis)
    kw = c.connection_pool.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"], kw["username"], kw["password"]) == (
        "10.1.2.3",
        6380,
        2,
        "user",
        "s3cret",
    )
    t = connect("rediss://h:6379/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required")
    kw = t.connection_pool.connection_kwargs
    assert kw["ssl_ca_certs"] == "/ca.pem" and kw["ssl_cert_reqs"] == "required"


def test_cluster_url() -> None:
    assert isinstance(connect("redis+cluster://127.0.0.1:7000"), RedisCluster)


def test_sentinel_url() -> None:
    c = connect("redis+sentinel://:pw@s1:26379,s2:26380/mymaster/3")
    assert isinstance(c, Redis)
    assert c.connection_pool.service_name == "mymaster"  # type: ignore[attr-defined]
    assert c.connection_pool.connection_kwargs["db"] == 3


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("http://h:1", "scheme"),
        ("redis://h:1/x", "database"),
        ("redis://h:1/0?bogus=1", "unknown Redis URL option"),
        ("redis://h:1/0?ssl_ca_certs=/x", "rediss"),
        ("redis+sentinel://s1:26379", "master name"),
        ("redis+sentinel://s1/m", "host:port"),
        ("redis:///0", "host"),
    ],
)
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(RedisURLError, match=match):
        connect(url)


def test_redaction() -> None:
    assert redact_url("redis://u:p4ss@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("rediss://:p4ss@h:1") == "rediss://:***@h:1"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    with pytest.raises(RedisURLError) as err:
        connect("redis://u:topsecret@h:1/0?nope=1")
    assert "topsecret" not in str(err.value)


@pytest.mark.redis
async def test_real_connections(redis_url: str, redis_cluster_url: str) -> None:
    for url in (redis_url, redis_cluster_url):
        c = connect(url)
        assert await c.ping()
        await c.aclose()


def test_free_ports_are_distinct_and_bindable() -> None:
    # Processes started together (a bench's router replicas) each get their own port: two
    # replicas on one port made the routing bench scrape one replica twice.
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:4]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
