"""The worker registry in Redis: register, heartbeat, deregister, read.

``<prefix>:registry`` (HASH) maps a worker id to a JSON description; ``<prefix>:heartbeat``
(ZSET) maps it to its last heartbeat in wall-clock ms. A worker (or a sidecar next to it)
calls `register_worker` every few seconds (it is idempotent and is the heartbeat: a Redis
that restarted empty relearns the worker at the next call; `heartbeat` alone only refreshes
the time). Routers with ``KVR_DISCOVERY=redis`` read both and drop workers whose heartbeat is
older than ``KVR_HEARTBEAT_TIMEOUT_S``. Deregistering removes both entries.

Description fields: ``url`` (required, http(s)://host:port), ``models`` (list; empty = every
model the router serves), ``capacity_blocks`` (int, 0 = unknown), ``dp_rank`` (int),
``adapters`` (object, LoRA adapter -> base model, for adapters listed in ``models``; a
worker's own ``/v1/models`` wins when the router polls it), ``role`` (``prefill``, ``decode``
or ``both``, the default).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from kvrouter.index.keys import KeyNameError, KeySchema, validate_worker_id
from router_node.settings import WorkerSpec, parse_role

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RegisteredWorker:
    id: str
    url: str
    models: tuple[str, ...] = ()
    capacity_blocks: int = 0
    dp_rank: int | None = None
    heartbeat_ms: int = 0
    adapters: tuple[tuple[str, str], ...] = ()
    """(adapter, base model) pairs."""
    role: str = "both"
    """``prefill``, ``decode`` or ``both`` (absent in the entry = both)."""


def _now_ms() -> int:
    return int(time.time() * 1000)


async def register_worker(
    client: Any,
    schema: KeySchema,
    worker_id: str,
    url: str,
    *,
    models: tuple[str, ...] = (),
    capacity_blocks: int = 0,
    dp_rank: int | None = None,
    adapters: dict[str, str] | None = None,
    kv_events: dict[str, Any] | None = None,
    role: str = "both",
    now_ms: int | None = None,
) -> None:
    """Add or update a worker and heartbeat it. `adapters` maps each LoRA adapter in
    `models` to its base model; `kv_events` (``endpoint``, ``replay``, ``topic``,
    ``block_size``) is what a listener with registry discovery subscribes to; `role` puts it
    in the prefill or decode pool."""
    validate_worker_id(worker_id)
    WorkerSpec.parse(url)  # same URL rules as static workers
    desc = {
        "url": url.rstrip("/"),
        "models": list(models),
        "capacity_blocks": int(capacity_blocks),
        "dp_rank": dp_rank,
    }
    if adapters:
        desc["adapters"] = dict(adapters)
    if kv_events:
        desc["kv_events"] = dict(kv_events)
    if parse_role(role) != "both":
        desc["role"] = parse_role(role)
    await client.hset(schema.registry, worker_id, json.dumps(desc))
    await heartbeat(client, schema, worker_id, now_ms=now_ms)


async def heartbeat(
    client: Any, schema: KeySchema, worker_id: str, *, now_ms: int | None = None
) -> None:
    """Mark a registered worker alive now."""
    await client.zadd(schema.heartbeats, {validate_worker_id(worker_id): now_ms or _now_ms()})


async def deregister_worker(client: Any, schema: KeySchema, worker_id: str) -> None:
    """Remove a worker from the registry (routers drop it at their next read)."""
    await client.hdel(schema.registry, worker_id)
    await client.zrem(schema.heartbeats, worker_id)


async def read_registry(
    client: Any, schema: KeySchema, *, max_age_ms: int, now_ms: int | None = None
) -> list[RegisteredWorker]:
    """Registered workers whose heartbeat is at most `max_age_ms` old. Entries that do not
    parse are logged and skipped (a bad entry must not take the others down)."""
    now = now_ms or _now_ms()
    raw = await client.hgetall(schema.registry)
    beats = dict(
        await client.zrangebyscore(schema.heartbeats, now - max_age_ms, "+inf", withscores=True)
    )
    out: list[RegisteredWorker] = []
    for wid_raw, desc_raw in raw.items():
        wid = wid_raw.decode() if isinstance(wid_raw, bytes) else str(wid_raw)
        beat = beats.get(wid) or beats.get(wid.encode())
        if beat is None:
            continue
        try:
            validate_worker_id(wid)
            desc = json.loads(desc_raw)
            spec = WorkerSpec.parse(str(desc["url"]))
            models = tuple(str(m) for m in desc.get("models") or ())
            adapters = desc.get("adapters") or {}
            if not isinstance(adapters, dict):
                raise ValueError("'adapters' must be an object")
            out.append(
                RegisteredWorker(
                    wid,
                    spec.url,
                    models,
                    int(desc.get("capacity_blocks") or 0),
                    None if desc.get("dp_rank") is None else int(desc["dp_rank"]),
                    int(beat),
                    tuple((str(a), str(p)) for a, p in adapters.items()),
                    parse_role(str(desc.get("role") or "both")),
                )
            )
        except (KeyNameError, ValueError, KeyError, TypeError) as exc:
            log.warning("registry entry %r skipped: %s", wid, exc)
    return out
