"""Redis clients from one URL: standalone, Cluster or Sentinel, with TLS and ACL users.

    redis://[user:password@]host:port/db             one server
    rediss://...                                      the same over TLS
    redis+cluster://[user:password@]host:port         Redis Cluster (any node; others discovered)
    rediss+cluster://...                              Cluster over TLS
    redis+sentinel://[user:password@]h1:p1,h2:p2/master-name[/db]
    rediss+sentinel://...                             Sentinel-managed primary over TLS

TLS options ride in the query string as redis-py names them: ``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (required|optional|none),
``ssl_check_hostname``. Sentinel credentials for the sentinels themselves, when they differ,
go in ``sentinel_username`` / ``sentinel_password``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

SCHEMES = (
    "redis",
    "rediss",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
_TLS_KEYS = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}


class RedisURLError(ValueError):
    """The Redis URL cannot be used; the message says why (the password is never included)."""


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    netloc = f"{user}:***@{parts.netloc.rsplit('@', 1)[1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _options(query: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k in _TLS_KEYS:
            opts[k] = v.lower() in ("1", "true", "yes") if k == "ssl_check_hostname" else v
        elif k in ("sentinel_username", "sentinel_password"):
            opts[k] = v
        else:
            raise RedisURLError(f"unknown Redis URL option {k!r}")
    return opts


def connect(url: str, *, decode_responses: bool = True, **kwargs: Any) -> Any:
    """An asyncio Redis client for `url` (``redis.asyncio.Redis`` or ``RedisCluster``).

    Nothing is sent until the first command; call ``ping()`` to check the connection.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise RedisURLError(f"malformed Redis URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise RedisURLError(f"Redis URL scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
    tls = scheme.startswith("rediss")
    opts = _options(parts.query)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    common: dict[str, Any] = {
        "decode_responses": decode_responses,
        "username": username,
        "password": password,
        **kwargs,
    }
    tls_opts = {k: v for k, v in opts.items() if k in _TLS_KEYS}
    if tls:
        common["ssl"] = True
        common.update(tls_opts)
    elif tls_opts:
        raise RedisURLError("TLS options need a rediss:// URL")

    if scheme.endswith("+cluster"):
        if not parts.hostname:
            raise RedisURLError("a cluster URL needs host:port of at least one node")
        return RedisCluster(host=parts.hostname, port=parts.port or 6379, **common)

    if scheme.endswith("+sentinel"):
        hosts = []
        netloc = parts.netloc.rsplit("@", 1)[-1]
        for item in netloc.split(","):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit():
                raise RedisURLError(f"sentinel address {item!r} must be host:port")
            hosts.append((host.strip("[]"), int(port)))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise RedisURLError("a sentinel URL needs the master name as its path: /mymaster")
        service = unquote(path[0])
        db = int(path[1]) if len(path) > 1 and path[1].isdigit() else 0
        sentinel_kwargs: dict[str, Any] = {}
        if "sentinel_password" in opts:
            sentinel_kwargs["password"] = opts["sentinel_password"]
            sentinel_kwargs["username"] = opts.get("sentinel_username")
        if tls:
            sentinel_kwargs.update({"ssl": True, **tls_opts})
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **common)  # type: ignore[no-untyped-call]
        return sentinel.master_for(service, db=db)

    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise RedisURLError(f"database must be a number, got {db_text!r}")
    if not parts.hostname:
        raise RedisURLError("the Redis URL needs a host")
    return aioredis.Redis(host=parts.hostname, port=parts.port or 6379, db=int(db_text), **common)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)
