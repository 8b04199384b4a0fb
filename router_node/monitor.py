"""Background work of a router replica: active health checks, capacity scraping, each
worker's models (its ``GET /v1/models``, LoRA adapters included), worker discovery (the Redis
registry, Kubernetes EndpointSlices), and clearing the residency of workers that stay out past
the grace period.

One task per concern, each a loop that never raises (a failing check is a result, not a
crash); `Monitor.run()` starts them and `close()` stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time

import aiohttp

from kvrouter.discovery.base import EndpointSource
from router_node.feedback import Feedback, connection_refused
from router_node.metrics import Metrics
from router_node.registry import read_registry
from router_node.settings import RouterSettings
from router_node.shared_index import REDIS_FAILURES, SharedIndex
from router_node.workers import Worker, WorkerPool

log = logging.getLogger(__name__)

_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_vllm_cache_config(text: str) -> tuple[int, int] | None:
    """``(num_gpu_blocks, block_size)`` from vLLM's Prometheus text, or None if absent."""
    m = _CACHE_INFO.search(text)
    if not m:
        return None
    labels = dict(_LABEL.findall(m.group(1)))
    try:
        blocks = int(labels["num_gpu_blocks"])
        size = int(labels["block_size"])
    except (KeyError, ValueError):
        return None
    return (blocks, size) if blocks > 0 and size > 0 else None


def parse_model_list(body: object) -> tuple[frozenset[str] | None, dict[str, str]]:
    """(model ids, adapter -> parent) from an OpenAI ``/v1/models`` body; (None, {}) when it
    is not one. vLLM lists a LoRA adapter as an entry whose ``parent`` is the base model."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None, {}
    ids: set[str] = set()
    parents: dict[str, str] = {}
    for entry in body["data"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        ids.add(entry["id"])
        parent = entry.get("parent")
        if isinstance(parent, str) and parent and parent != entry["id"]:
            parents[entry["id"]] = parent
    return frozenset(ids), parents


class Monitor:
    def __init__(
        self,
        settings: RouterSettings,
        pool: WorkerPool,
        shared: SharedIndex,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        source: EndpointSource | None = None,
        feedback: Feedback | None = None,
    ) -> None:
        """`feedback`: told of health checks a worker refused (an engine outage: its records
        are dropped) or passed."""
        self.settings = settings
        self.feedback = feedback
        self.source = source
        self.pool = pool
        self.shared = shared
        self.session = session
        self.metrics = metrics
        self.tasks: list[asyncio.Task[None]] = []
        self.catalogue = settings.catalogue()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        if s.health_interval_s > 0:
            self.tasks.append(loop.create_task(self._every(s.health_interval_s, self.check_all)))
        if s.models_interval_s > 0:
            self.tasks.append(loop.create_task(self._every(s.models_interval_s, self.poll_all)))
        if s.discovery == "redis" and self.shared.enabled:
            self.tasks.append(
                loop.create_task(self._every(s.registry_interval_s, self.refresh_registry))
            )
        if self.source is not None:
            self.tasks.append(loop.create_task(self.follow(self.source)))
        tick = min(1.0, max(0.05, s.clear_grace_s / 4))
        self.tasks.append(loop.create_task(self._every(tick, self.housekeeping)))

    async def close(self) -> None:
        if self.source is not None:
            await self.source.close()
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.tasks.clear()

    async def _every(self, period: float, fn: object) -> None:
        assert callable(fn)
        while True:
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one pass must not stop the loop
                log.exception("monitor pass %s failed", getattr(fn, "__name__", fn))
            await asyncio.sleep(period)

    # -- active health and capacity ----------------------------------------------------------
    async def check_all(self) -> None:
        workers = list(self.pool.workers.values())
        await asyncio.gather(*(self.check(w) for w in workers if w.registered))

    async def check(self, worker: Worker) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.settings.health_timeout_s)
        try:
            async with self.session.get(f"{worker.url}/health", timeout=timeout) as resp:
                ok = resp.status == 200
                await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            ok = False
            if self.feedback is not None and connection_refused(exc):
                self.feedback.refused(worker.id)
        else:
            if self.feedback is not None:
                self.feedback.answered(worker.id)
        if ok != worker.healthy:
            log.info("worker %s %s", worker.id, "healthy" if ok else "failed its health check")
        self.pool.record_check(worker, ok)
        if ok and not worker.capacity_blocks and self.settings.scrape_capacity:
            await self.scrape_capacity(worker)
        return ok

    async def scrape_capacity(self, worker: Worker) -> None:
        """Capacity from vLLM's ``vllm:cache_config_info``, converted to router blocks."""
        timeout = aiohttp.ClientTimeout(total=self.settings.health_timeout_s)
        try:
            async with self.session.get(f"{worker.url}/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            return
        found = parse_vllm_cache_config(text)
        if found is None:
            return
        blocks, engine_block_size = found
        router_block_size = self._block_size(worker)
        if engine_block_size != router_block_size:
            log.warning(
                "worker %s uses block size %d but the router uses %d: set --block-size to match "
                "for exact residency",
                worker.id,
                engine_block_size,
                router_block_size,
            )
        worker.capacity_blocks = blocks * engine_block_size // router_block_size
        worker.capacity_source = "vllm_metrics"
        log.info("worker %s: capacity %d blocks (vllm metrics)", worker.id, worker.capacity_blocks)

    def _block_size(self, worker: Worker) -> int:
        """The router block size of the base model the worker serves (an engine serves one),
        else the router-wide one."""
        names = worker.listed if worker.listed is not None else worker.models
        sizes = {self.catalogue.bases[m].block_size for m in names if m in self.catalogue.bases}
        return sizes.pop() if len(sizes) == 1 else self.settings.block_size

    # -- models ----------------------------------------------------------------------------------
    async def poll_all(self) -> None:
        workers = list(self.pool.workers.values())
        await asyncio.gather(*(self.poll_models(w) for w in workers if w.registered))

    async def poll_models(self, worker: Worker) -> bool:
        """Read the worker's ``/v1/models``: the models it serves, and each adapter's parent.
        A worker that does not answer keeps what it listed last (health checks decide
        whether it takes requests)."""
        timeout = aiohttp.ClientTimeout(total=self.settings.health_timeout_s)
        try:
            async with self.session.get(
                f"{worker.url}/v1/models", timeout=timeout, headers=dict(worker.headers)
            ) as resp:
                if resp.status != 200:
                    return False
                body = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return False
        listed, parents = parse_model_list(body)
        if listed is None:
            log.warning("worker %s: /v1/models answer has no model list", worker.id)
            return False
        if listed != worker.listed:
            log.info("worker %s serves %s", worker.id, ", ".join(sorted(listed)) or "nothing")
        worker.listed = listed
        worker.parents = parents
        return True

    # -- registry ------------------------------------------------------------------------------
    async def refresh_registry(self) -> None:
        if not self.shared.up:
            return  # keep the last known registry workers while Redis is down
        try:
            entries = await read_registry(
                self.shared.client,
                self.settings.key_schema,
                max_age_ms=int(self.settings.heartbeat_timeout_s * 1000),
            )
        except REDIS_FAILURES as exc:
            self.shared.mark_down("registry", exc)
            return
        joined = self.pool.sync_registry(
            (e.id, e.url, e.models, e.capacity_blocks, e.dp_rank) for e in entries
        )
        self.pool.set_roles("registry", ((e.id, e.role) for e in entries))
        for e in entries:
            w = self.pool.get(e.id)
            if w is not None and w.source == "registry" and w.listed is None:
                w.parents = dict(e.adapters)  # until its own /v1/models says
        await self._joined(joined, "the registry")

    async def _joined(self, ids: list[str], where: str) -> None:
        for wid in ids:
            log.info("worker %s joined from %s", wid, where)
            w = self.pool.workers[wid]
            if self.settings.models_interval_s > 0:
                # Its models first: in a several-model fleet a worker is routed to only for
                # the models it lists (else 404 until the next poll), and the capacity
                # scrape below compares its block size with its own model's.
                await self.poll_models(w)
            if self.settings.health_interval_s > 0:
                await self.check(w)

    # -- Kubernetes (or any EndpointSource) ------------------------------------------------------
    async def follow(self, source: EndpointSource) -> None:
        """Apply each snapshot of `source` to the pool until it ends or is closed. A snapshot
        is the whole set: workers missing from it leave (and are cleared after the grace)."""
        try:
            async for snapshot in source.snapshots():
                # A pod serving several data-parallel ranks is pinned rank by rank, rank 0 too.
                dp_urls = {e.url for e in snapshot if e.dp_rank > 0}
                joined = self.pool.sync_source(
                    "kubernetes",
                    (
                        (e.worker_id, e.url, (), 0, e.dp_rank if e.url in dp_urls else None)
                        for e in snapshot
                        if e.ready
                    ),
                )
                self.pool.set_roles("kubernetes", ((e.worker_id, e.role) for e in snapshot))
                await self._joined(joined, "discovery")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker discovery stopped; keeping the last known workers")

    # -- outages -------------------------------------------------------------------------------
    async def housekeeping(self) -> None:
        now = time.monotonic()
        for w in self.pool.workers.values():
            self.metrics.worker_up.labels(w.id).set(1 if w.available(now) else 0)
            self.metrics.inflight.labels(w.id).set(w.inflight)
        for w in self.pool.due_for_clearing(now):
            done = True
            for model in w.models_among(self.settings.models):
                done = await self.shared.clear_worker(model, w.id) and done
            if done or not self.shared.enabled:
                w.cleared = True
                self.metrics.cleared.labels(w.id).inc()
                log.info(
                    "worker %s out for %.0f s: residency cleared", w.id, now - (w.down_since or now)
                )
                self.pool.forget(w.id)
