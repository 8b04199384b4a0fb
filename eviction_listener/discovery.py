"""Where the listener learns which engines publish KV events: the seam for worker discovery.

A discovery source is anything with ``async def engines() -> Sequence[EngineSpec]`` (the
``EngineDiscovery`` protocol), polled every ``discovery_interval_s``. Shipped: ``static``
(``KVR_ENGINES``) and ``redis`` (the worker registry routers read). A Kubernetes source
(being built as ``kvrouter/discovery/``) plugs in by implementing the protocol and a branch
in ``make_discovery``.

Registry entries (``<prefix>:registry``, worker id -> JSON, heartbeat in ``<prefix>:heartbeat``)
are used when their heartbeat is fresh, they serve the model (or list no models) and carry::

    "kv_events": {"endpoint": "tcp://host:5557", "replay": "tcp://host:5558",
                  "topic": "", "block_size": 16}

One registry entry is one worker (one DP rank: ids ``ID#dpN`` with ``dp_rank`` N keep their
own, already offset, endpoints).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from eviction_listener.settings import EngineSpec, ListenerSettings
from kvrouter.index.keys import KeySchema

logger = logging.getLogger(__name__)


class EngineDiscovery(Protocol):
    async def engines(self) -> Sequence[EngineSpec]: ...


class StaticDiscovery:
    def __init__(self, specs: Sequence[EngineSpec]) -> None:
        self._specs = list(specs)

    async def engines(self) -> Sequence[EngineSpec]:
        return self._specs


class RedisRegistryDiscovery:
    """Engines from the worker registry in Redis (entries with a ``kv_events`` object)."""

    def __init__(
        self, client: Any, schema: KeySchema, model: str, *, max_age_ms: int = 30_000
    ) -> None:
        self._client = client
        self._schema = schema
        self._model = model
        self._max_age_ms = max_age_ms

    async def engines(self) -> Sequence[EngineSpec]:
        now = int(time.time() * 1000)
        raw = await self._client.hgetall(self._schema.registry)
        beats = await self._client.zrangebyscore(
            self._schema.heartbeats, now - self._max_age_ms, "+inf"
        )
        fresh = {b.decode() if isinstance(b, bytes) else str(b) for b in beats}
        out: list[EngineSpec] = []
        for wid_raw, desc_raw in raw.items():
            wid = wid_raw.decode() if isinstance(wid_raw, bytes) else str(wid_raw)
            if wid not in fresh:
                continue
            try:
                desc = json.loads(desc_raw)
                ev = desc.get("kv_events")
                if not ev:
                    continue
                models = desc.get("models") or []
                if models and self._model not in models:
                    continue
                base, _, rank = wid.partition("#dp")
                spec = EngineSpec.parse(f"{base}={ev['endpoint']}")
                block = ev.get("block_size")
                out.append(
                    EngineSpec(
                        spec.worker_id,
                        spec.endpoint,
                        ev.get("replay") or None,
                        1,
                        str(ev.get("topic") or ""),
                        int(block) if block else None,
                        rank=int(rank) if rank else None,
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("registry entry %r has no usable kv_events: %s", wid, exc)
        return out


def make_discovery(settings: ListenerSettings, client: Any) -> EngineDiscovery:
    if settings.discovery == "redis":
        return RedisRegistryDiscovery(
            client,
            KeySchema(settings.key_prefix),
            settings.model,
            max_age_ms=max(30_000, int(settings.discovery_interval_s * 3000)),
        )
    return StaticDiscovery(settings.engines)
