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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import DataError

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # hiredis is a dependency; without it redis-py's own packer is used
    _hiredis_pack = None

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


# Commands with at least this many arguments go through hiredis's C packer. redis-py's asyncio
# connections pack every argument in Python (its sync client already uses hiredis): about
# 2.8 ms for the 4,100 arguments of a 2,048-block record's ZADD, against 0.4 ms in C.
FAST_PACK_MIN_ARGS = 32


_FAST: dict[type[Any], type[Any]] = {}


@dataclass(frozen=True, slots=True)
class PackedArgs:
    """The last arguments of a command, already encoded: `count` RESP bulk strings back to back
    in `data`. Only connections of clients made by ``connect`` accept it (see
    ``accepts_packed_args``); kvrouter.index.resp builds a record's ZADD arguments this way."""

    count: int
    data: bytes


def fast_packing(cls: type[Any]) -> type[Any]:
    """`cls` (a redis-py asyncio connection class) packing long commands with hiredis.

    Short commands keep redis-py's packer, so everything else behaves exactly as before; long
    ones are packed as redis-py's sync client packs them when hiredis is installed (a first
    argument with spaces, like "CONFIG GET", is split into words; str is UTF-8, the
    encoding these clients use).
    """

    def pack_command(self: Any, *args: Any) -> list[bytes]:
        if args and isinstance(args[-1], PackedArgs):
            raw = args[-1]
            head = b"".join(pack_command(self, *args[:-1]))
            end = head.index(b"\r\n")  # "*<count>\r\n": the first arguments, words split
            return [b"*%d" % (int(head[1:end]) + raw.count) + head[end:], raw.data]
        if _hiredis_pack is None or len(args) < FAST_PACK_MIN_ARGS:
            packed: list[bytes] = cls.pack_command(self, *args)
            return packed
        head = args[0]
        if isinstance(head, str):
            args = tuple(head.encode().split()) + args[1:]
        elif b" " in head:
            args = tuple(head.split()) + args[1:]
        try:
            return [_hiredis_pack(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from None

    if getattr(cls, "_kvr_fast_packing", False):
        return cls
    if cls not in _FAST:
        _FAST[cls] = type(
            f"FastPack{cls.__name__}",
            (cls,),
            {"pack_command": pack_command, "_kvr_fast_packing": True},
        )
    return _FAST[cls]


def accepts_packed_args(client: Any) -> bool:
    """Whether `client`'s connections take a trailing ``PackedArgs`` (clients from connect)."""
    if isinstance(client, RedisCluster):
        cls = client.nodes_manager.connection_kwargs.get("connection_class")
    else:
        cls = getattr(getattr(client, "connection_pool", None), "connection_class", None)
    return bool(getattr(cls, "_kvr_fast_packing", False))


def _use_fast_packing(client: Any) -> Any:
    """Make every connection `client` opens pack long commands in C (see `fast_packing`)."""
    if isinstance(client, RedisCluster):
        # Nodes discovered later are built from the manager's kwargs; the startup nodes
        # exist already (they open no connection before the first command).
        nm = client.nodes_manager
        nm.connection_kwargs["connection_class"] = fast_packing(
            nm.connection_kwargs.get("connection_class", aioredis.Connection)
        )
        for node in nm.startup_nodes.values():
            node.connection_class = fast_packing(node.connection_class)
    else:
        pool = client.connection_pool
        pool.connection_class = fast_packing(pool.connection_class)
    return client


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
        return _use_fast_packing(
            RedisCluster(host=parts.hostname, port=parts.port or 6379, **common)
        )

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
        return _use_fast_packing(sentinel.master_for(service, db=db))

    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise RedisURLError(f"database must be a number, got {db_text!r}")
    if not parts.hostname:
        raise RedisURLError("the Redis URL needs a host")
    return _use_fast_packing(
        aioredis.Redis(host=parts.hostname, port=parts.port or 6379, db=int(db_text), **common)
    )


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def pubsub_client(client: Any) -> Any:
    """A client whose ``pubsub()`` works: `client` itself, or for a Cluster a plain client on
    one of its nodes, with the same credentials and TLS.

    redis-py's asyncio ``RedisCluster`` has no ``pubsub()``; classic SUBSCRIBE on any node
    receives every PUBLISH made on any node (the cluster bus broadcasts it). Call after the
    Cluster client has run a command (it learns its nodes then); close the returned client
    when it is not `client`.
    """
    if not is_cluster(client):
        return client
    node = client.get_random_node()
    # the node's connection kwargs carry its host and port, credentials and TLS
    pool = aioredis.ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
    return aioredis.Redis(connection_pool=pool)
