"""Worker notices: a versioned msgpack schema on Redis pub/sub, for workers or sidecars that do
not publish engine KV events over ZMQ. The schema, the channel and the staleness bound are
documented in docs/notices.md; this module is its one implementation (decode, encode, publish).

One message is one msgpack map (schema version 1)::

    {"v": 1, "op": "store" | "evict" | "clear", "worker": "<router worker id>",
     "keys": [u64, ...]          # router block keys (a chain from its first block for store)
     | "tokens": [u32, ...],     # or the prompt's token ids; keys are computed (full blocks)
     "from_block": int,          # evict by tokens: first block evicted (default 0)
     "lora_name": str | nil, "cache_salt": str | nil, "ts": float (sender's clock, seconds)}

Unknown fields are ignored (additions within version 1 stay compatible); a higher ``v`` is
refused and counted, so a consumer never half-understands a message.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgpack

from kvrouter.index.keys import (
    DEFAULT_PREFIX,
    KeyNameError,
    KeySchema,
    glob_escape,
    validate_worker_id,
)

NOTICE_VERSION: Final = 1
NoticeOp = Literal["store", "evict", "clear"]
NOTICE_OPS: Final = ("store", "evict", "clear")
MAX_NOTICE_BYTES: Final = 16 * 1024 * 1024
MAX_NOTICE_KEYS: Final = 131_072
MAX_NOTICE_TOKENS: Final = 2_097_152
MAX_NAME_BYTES: Final = 1024
NOTICE_ERROR_KINDS: Final = (
    "msgpack",
    "shape",
    "type",
    "value",
    "version",
    "too_large",
    "channel",
)
"""Every ``NoticeDecodeError.kind``: stable metric label values."""
_U64: Final = (1 << 64) - 1
_TOKEN_TYPECODE: Final = "I" if array("I").itemsize == 4 else "L"


class NoticeDecodeError(ValueError):
    """A notice that cannot be used; ``kind`` is one of ``NOTICE_ERROR_KINDS``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Notice:
    """One decoded notice. Exactly one of ``keys`` / ``tokens`` is set for store and evict."""

    op: NoticeOp
    worker: str
    keys: tuple[int, ...] | None = None
    tokens: array[int] | None = None
    from_block: int = 0
    lora_name: str | None = None
    cache_salt: str | None = None
    ts: float | None = None


def _opt_str(m: dict[str, Any], name: str) -> str | None:
    v = m.get(name)
    if v is None:
        return None
    if type(v) is not str:
        raise NoticeDecodeError("type", f"{name} is {type(v).__name__}, not a string")
    if not v or len(v) > MAX_NAME_BYTES:
        raise NoticeDecodeError("value", f"{name} must be 1-{MAX_NAME_BYTES} characters")
    return v


def decode_notice(payload: bytes | str) -> Notice:
    """Decode one pub/sub message. Raises only ``NoticeDecodeError``."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogateescape")
    size = len(payload)
    if size > MAX_NOTICE_BYTES:
        raise NoticeDecodeError("too_large", f"{size} bytes")
    try:
        m = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_array_len=min(size, MAX_NOTICE_TOKENS),
            max_map_len=min(size, 64),
            max_str_len=min(size, MAX_NAME_BYTES * 4),
            max_bin_len=min(size, MAX_NAME_BYTES),
            max_ext_len=min(size, MAX_NAME_BYTES),
        )
    except Exception as exc:  # msgpack raises many types on hostile input
        kind = "too_large" if "exceeds max_" in str(exc) else "msgpack"
        raise NoticeDecodeError(kind, f"{type(exc).__name__}: {exc}") from None
    if type(m) is not dict:
        raise NoticeDecodeError("type", f"notice is {type(m).__name__}, not a map")
    v = m.get("v")
    if type(v) is not int:
        raise NoticeDecodeError("shape", "no integer schema version 'v'")
    if v != NOTICE_VERSION:
        raise NoticeDecodeError("version", f"schema version {v}; this listener reads 1")
    op = m.get("op")
    if op not in NOTICE_OPS:
        raise NoticeDecodeError("value", f"op must be one of {', '.join(NOTICE_OPS)}")
    worker = m.get("worker")
    if type(worker) is not str:
        raise NoticeDecodeError("type", "worker must be a string")
    try:
        validate_worker_id(worker)
    except KeyNameError as exc:
        raise NoticeDecodeError("value", str(exc)) from None
    lora_name = _opt_str(m, "lora_name")
    cache_salt = _opt_str(m, "cache_salt")
    ts = m.get("ts")
    if ts is not None and type(ts) not in (int, float):
        raise NoticeDecodeError("type", "ts must be a number")
    from_block = m.get("from_block", 0)
    if type(from_block) is not int or from_block < 0:
        raise NoticeDecodeError("value", "from_block must be an integer >= 0")
    keys: tuple[int, ...] | None = None
    tokens: array[int] | None = None
    raw_keys, raw_tokens = m.get("keys"), m.get("tokens")
    if op != "clear":
        if (raw_keys is None) == (raw_tokens is None):
            raise NoticeDecodeError("shape", f"{op} needs exactly one of keys, tokens")
        if raw_keys is not None:
            if type(raw_keys) is not list:
                raise NoticeDecodeError("type", "keys must be an array")
            if len(raw_keys) > MAX_NOTICE_KEYS:
                raise NoticeDecodeError("too_large", f"{len(raw_keys)} keys")
            if any(type(k) is not int for k in raw_keys):
                raise NoticeDecodeError("type", "keys must be unsigned 64-bit integers")
            try:
                array("Q", raw_keys)
            except OverflowError:
                raise NoticeDecodeError("value", "keys must be in [0, 2**64)") from None
            keys = tuple(raw_keys)
        else:
            if type(raw_tokens) is not list:
                raise NoticeDecodeError("type", "tokens must be an array")
            if any(type(t) is not int for t in raw_tokens):
                raise NoticeDecodeError("type", "tokens must be integers")
            try:
                tokens = array(_TOKEN_TYPECODE, raw_tokens)
            except OverflowError:
                raise NoticeDecodeError("value", "token ids must be in [0, 2**32)") from None
    return Notice(op, worker, keys, tokens, from_block, lora_name, cache_salt, ts)


def encode_notice(
    op: NoticeOp,
    worker: str,
    *,
    keys: Sequence[int] | None = None,
    tokens: Sequence[int] | None = None,
    from_block: int = 0,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    ts: float | None = None,
) -> bytes:
    """One notice as bytes (validated by decoding it: what is sent is what is read)."""
    m: dict[str, Any] = {"v": NOTICE_VERSION, "op": op, "worker": worker}
    if keys is not None:
        m["keys"] = list(keys)
    if tokens is not None:
        m["tokens"] = list(tokens)
    if from_block:
        m["from_block"] = from_block
    if lora_name is not None:
        m["lora_name"] = lora_name
    if cache_salt is not None:
        m["cache_salt"] = cache_salt
    m["ts"] = time.time() if ts is None else ts
    payload: bytes = msgpack.packb(m, use_bin_type=True)
    decode_notice(payload)
    return payload


def notice_channel(model: str, prefix: str = DEFAULT_PREFIX, worker: str | None = None) -> str:
    """``kvr:{model}:notices``: the channel of the model's notices (adapters included); with
    `worker`, that worker's own channel ``kvr:{model}:notices:<worker>``."""
    keys = KeySchema(prefix).model(model)
    return keys.notices if worker is None else keys.worker_notices(worker)


def check_channel(notice: Notice, channel: str, prefix: str) -> None:
    """Refuse a notice received on a worker's own channel (``<prefix><worker>``, `prefix`
    being ``ModelKeys.worker_notices_prefix``) that speaks for another worker."""
    if not channel.startswith(prefix) or channel[len(prefix) :] != notice.worker:
        raise NoticeDecodeError(
            "channel", f"notice for worker {notice.worker!r} on channel {channel!r}"
        )


def worker_acl_rules(models: Sequence[str], worker: str, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The Redis 7 ACL rules of a user that may only PUBLISH `worker`'s notices of `models`
    (to follow ``ACL SETUSER <user> on ><password>``): no keys, no other channel, no other
    command. docs/notices.md and the chart's per-worker users use the same rules."""
    channels = [
        "&" + glob_escape(KeySchema(prefix).model(m).worker_notices(worker)) for m in models
    ]
    return ["resetkeys", "resetchannels", *channels, "-@all", "+publish", "+ping", "+hello"]


async def publish_notice(
    client: Any,
    model: str,
    op: NoticeOp,
    worker: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    own_channel: bool = False,
    **fields: Any,
) -> int:
    """Publish a notice with an asyncio redis client; returns how many subscribers got it.

    ``fields`` are ``encode_notice``'s keyword arguments (keys, tokens, from_block,
    lora_name, cache_salt, ts). Publish on the base model's channel, adapters included;
    with `own_channel`, on the worker's own channel (what a per-worker ACL user may do).
    """
    # PUBLISH through execute_command: redis-py's asyncio RedisCluster (6.x, 7.x) has no
    # publish() method, but sends the command to a node, and the cluster bus delivers it.
    channel = notice_channel(model, prefix, worker if own_channel else None)
    n = await client.execute_command("PUBLISH", channel, encode_notice(op, worker, **fields))
    return int(n)


def publish_notice_sync(
    client: Any,
    model: str,
    op: NoticeOp,
    worker: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    own_channel: bool = False,
    **fields: Any,
) -> int:
    """``publish_notice`` for a synchronous ``redis.Redis`` client (a worker's own thread)."""
    channel = notice_channel(model, prefix, worker if own_channel else None)
    return int(client.publish(channel, encode_notice(op, worker, **fields)))
