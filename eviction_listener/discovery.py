"""Where the listener learns which engines publish KV events: the seam for worker discovery.

A discovery source is anything with ``async def engines() -> Sequence[EngineSpec]`` (the
``EngineDiscovery`` protocol), polled every ``discovery_interval_s``; a source that also has
a ``changed`` asyncio.Event is read as soon as it is set. Shipped: ``static``
(``KVR_ENGINES``), ``redis`` (the worker registry routers read) and ``kubernetes`` (the
EndpointSlices the routers watch, read for the ports named ``KVR_K8S_EVENTS_PORT_NAME`` and
``KVR_K8S_REPLAY_PORT_NAME``; worker ids built by kvrouter/discovery, as the router's).

Registry entries (``<prefix>:registry``, worker id -> JSON, heartbeat in ``<prefix>:heartbeat``)
are used when their heartbeat is fresh, they serve the model (or list no models) and carry::

    "kv_events": {"endpoint": "tcp://host:5557", "replay": "tcp://host:5558",
                  "topic": "", "block_size": 16}

One registry entry is one worker (one DP rank: ids ``ID#dpN`` with ``dp_rank`` N keep their
own, already offset, endpoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from eviction_listener.settings import EngineSpec, ListenerSettings
from kvrouter.discovery.base import Endpoint, EndpointSource
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


def engine_from_endpoint(ep: Endpoint) -> EngineSpec | None:
    """The engine of one discovered worker (one DP rank, its ports already offset), or None
    when its slice names no KV-event port."""
    if ep.events_endpoint is None:
        return None
    base = ep.worker_id.partition("#dp")[0]
    return EngineSpec(
        base, ep.events_endpoint, ep.replay_endpoint, 1, "", None, rank=ep.dp_rank or None
    )


class KubernetesDiscovery:
    """Engines from a watch of EndpointSlices, kept current in a background task.

    ``engines()`` answers from the latest snapshot (waiting up to ``first_wait_s`` for the
    first one) and ``changed`` is set on every new snapshot, so engines that come and go are
    owned and released without waiting for the next poll.
    """

    def __init__(self, source: EndpointSource, *, first_wait_s: float = 5.0) -> None:
        self._source = source
        self._first_wait_s = first_wait_s
        self._latest: list[EngineSpec] = []
        self._first = asyncio.Event()
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async for snapshot in self._source.snapshots():
            specs = [engine_from_endpoint(ep) for ep in snapshot]
            self._latest = [s for s in specs if s is not None]
            skipped = len(snapshot) - len(self._latest)
            if skipped:
                logger.warning("%d discovered workers have no KV-event port: skipped", skipped)
            self._first.set()
            self.changed.set()

    async def engines(self) -> Sequence[EngineSpec]:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="listener kubernetes watch")
        if not self._first.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first.wait(), self._first_wait_s)
        return list(self._latest)

    async def close(self) -> None:
        """Stop the watch (idempotent)."""
        await self._source.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def make_discovery(settings: ListenerSettings, client: Any) -> EngineDiscovery:
    """The discovery source `settings` ask for."""
    if settings.discovery == "kubernetes":
        # Not-ready engines too: a pod failing readiness under load still changes its cache,
        # and its events keep the index right (docs/kubernetes.md, Readiness).
        return KubernetesDiscovery(settings.kubernetes_source(include_not_ready=True))
    if settings.discovery == "redis":
        return RedisRegistryDiscovery(
            client,
            KeySchema(settings.key_prefix),
            settings.model,
            max_age_ms=max(30_000, int(settings.discovery_interval_s * 3000)),
        )
    return StaticDiscovery(settings.engines)
