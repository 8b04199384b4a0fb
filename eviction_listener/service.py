"""The eviction listener process: engine KV events and worker notices into the shared index.

    listener = Listener(settings)
    await listener.run()          # until stop() / close() / SIGTERM (run_listener)

Tasks, all on one event loop:

* ownership tick (every lease/3): heartbeat, rendezvous assignment, lease renewals; a worker
  won is claimed (fencing its previous owner) and gets a ZMQ source that resumes from the
  stream position stored with the index; a worker lost or handed over has its source closed.
* one pump per owned worker: its ``ZmqEventSource`` items into the inbox (bounded: when full
  the pumps wait, the SUB sockets fill, and the engines' PUB drops, which later shows as a
  gap and is replayed or cleared).
* notices: Redis pub/sub on the model's channel; notices of workers this replica is
  responsible for go to the inbox.
* flush: takes everything queued (up to ``apply_batch``) and applies it in one Redis round
  trip (``Applier``).
* metrics: aiohttp on ``metrics_port``: /metrics, /health, /ready.

``close()`` (idempotent) drains: stop reading engines and notices, apply what was already
received within ``drain_grace_s``, release the leases (another replica takes over at once),
close everything. Nothing is lost if the grace runs out or the process is killed: the stream
position is stored atomically with the writes, so the next owner replays the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq.asyncio
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from redis.exceptions import RedisError

from eviction_listener.applier import Applier, InboxItem, KeyCache, WorkerState
from eviction_listener.batch_queue import BatchQueue
from eviction_listener.discovery import EngineDiscovery, make_discovery
from eviction_listener.metrics import (
    ListenerMetrics,
    ListenerState,
    LogLimiter,
    registry,
    render,
)
from eviction_listener.notices import Notice, NoticeDecodeError, check_channel, decode_notice
from eviction_listener.ownership import Ownership, rendezvous_owner
from eviction_listener.settings import EngineSpec, ListenerSettings
from eviction_listener.zmq_source import (
    Delivered,
    EngineEndpoint,
    SourceFailedError,
    SourceStats,
    ZmqEventSource,
    add_stats,
    dp_worker_id,
)
from kvrouter.backoff import Backoff
from kvrouter.index.connection import connect, pubsub_client, redact_url
from kvrouter.index.keys import KeySchema
from kvrouter.index.scripts import ClaimResult, OwnerLease, ResidencyIndex

logger = logging.getLogger(__name__)

LISTENER_KEY: web.AppKey[Listener] = web.AppKey("listener")


def _text(v: bytes | str) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v


def weight(item: InboxItem) -> int:
    """Block events in an inbox item (1 for a notice or a resync): the Redis work it costs."""
    it = item[1]
    if isinstance(it, Delivered):
        return max(1, sum(len(getattr(ev, "block_hashes", ())) for ev in it.batch.events))
    return 1


@dataclass(eq=False, slots=True)
class _Owned:
    state: WorkerState
    source: ZmqEventSource
    pump: asyncio.Task[None]


class Listener:
    """One listener replica. See the module docstring for what runs inside."""

    def __init__(
        self,
        settings: ListenerSettings,
        *,
        discovery: EngineDiscovery | None = None,
        zmq_context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = ListenerMetrics()
        self.registry = registry(self.metrics, self._metrics_state)
        self.schema = KeySchema(settings.key_prefix)
        self._discovery_arg = discovery
        self._ctx_arg = zmq_context
        self._ctx: zmq.asyncio.Context | None = None
        self._client: Any = None
        self._pubsub_client: Any = None
        self.index: ResidencyIndex | None = None
        self._ownership: Ownership | None = None
        self._applier: Applier | None = None
        self._inbox: BatchQueue[InboxItem] = BatchQueue(
            max(4 * settings.apply_batch, 1024), weight=weight
        )
        self._owned: dict[str, _Owned] = {}
        self._engines: dict[str, tuple[EngineEndpoint, int]] = {}
        self._retired = SourceStats()
        self._tasks: list[asyncio.Task[None]] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._stop = asyncio.Event()
        self._started = False
        self._closing = False
        self._closed = asyncio.Event()
        self._redis_ok = False
        self._ticked = asyncio.Event()
        self._noticed: dict[str, tuple[float, set[str]]] = {}
        self._log = LogLimiter(10.0)
        self.metrics_port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, load scripts, start every task. Raises if Redis is unreachable."""
        if self._started:
            return
        self._started = True
        s = self.settings
        logger.info(
            "listener %s for model %s on %s", s.listener_id, s.model, redact_url(s.redis_url)
        )
        self._client = connect(s.redis_connect_url)
        # Before any I/O: a discovery that cannot be configured (kubernetes outside a pod)
        # stops the start with its own message, not with a Redis error.
        self._discovery = self._discovery_arg or make_discovery(s, self._client)
        self.index = ResidencyIndex(self._client, self.schema)
        await self._client.ping()
        await self.index.load()
        self._ownership = Ownership(self.index, self.schema, s.listener_id, s.lease_ms, s.model)
        self._applier = Applier(
            self.index,
            model=s.model,
            block_size=s.block_size,
            hash_seed=s.hash_seed,
            ttl_ms=s.record_ttl_ms,
            capacity=s.worker_capacity_blocks,
            metrics=self.metrics,
            register_namespace=self._register_namespace,
            on_fenced=self._on_fenced,
            stopping=lambda: self._closing,
        )
        self._ctx = self._ctx_arg if self._ctx_arg is not None else zmq.asyncio.Context()
        await self._refresh_engines()
        if self._runner is None:
            await self._start_http()
        self._flush_task = asyncio.create_task(self._flush_loop(), name="listener flush")
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="listener ownership"))
        if s.discovery != "static":
            self._tasks.append(
                asyncio.create_task(self._discovery_loop(), name="listener discovery")
            )
        if s.notices:
            self._pubsub_client = connect(s.redis_connect_url, decode_responses=False)
            self._tasks.append(asyncio.create_task(self._notice_loop(), name="listener notices"))

    async def run(self) -> None:
        """Start, then serve until ``stop()`` or ``close()``; then drain and close."""
        await self.start()
        stop = asyncio.create_task(self._stop.wait())
        closed = asyncio.create_task(self._closed.wait())
        failed = self._flush_task
        assert failed is not None
        try:
            await asyncio.wait({stop, closed, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            closed.cancel()
            await self.close()
        if failed.done() and not failed.cancelled() and failed.exception() is not None:
            raise failed.exception()  # type: ignore[misc]

    def stop(self) -> None:
        """Ask ``run()`` to drain and return (safe from a signal handler)."""
        self._stop.set()

    async def wait_ticked(self) -> None:
        """Wait until the first ownership tick has run (workers claimed, sources started)."""
        await self._ticked.wait()

    async def close(self) -> None:
        """Drain within ``drain_grace_s`` and release everything. Idempotent."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            owned = list(self._owned.values())
            await asyncio.gather(*(self._stop_source(o) for o in owned), return_exceptions=True)
            self._inbox.close()
            if self._flush_task is not None:
                try:
                    await asyncio.wait_for(
                        asyncio.shield(self._flush_task), self.settings.drain_grace_s
                    )
                except (TimeoutError, Exception):
                    self._flush_task.cancel()
                    await asyncio.gather(self._flush_task, return_exceptions=True)
            if self._ownership is not None and self._redis_ok:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    async with asyncio.timeout(2.0):
                        await self._ownership.release(list(self._owned))
                        await self._ownership.leave()
                        self.metrics.handovers += len(self._owned)
            self._owned.clear()
            await self._close_discovery()
            if self._runner is not None:
                await self._runner.cleanup()
            for c in (self._client, self._pubsub_client):
                if c is not None:
                    with contextlib.suppress(Exception):
                        await c.aclose()
            if self._ctx is not None and self._ctx_arg is None:
                # destroy, not term: a socket some path left open is closed instead of
                # holding shutdown forever.
                self._ctx.destroy(linger=0)
        finally:
            self._closed.set()

    async def _close_discovery(self) -> None:
        close = getattr(getattr(self, "_discovery", None), "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()

    async def abort(self) -> None:
        """Stop at once: no drain, no lease release, no goodbye heartbeat. What a crashed
        replica looks like to the others (tests of takeover and resume use it)."""
        self._closing = True
        tasks = [*self._tasks, *(o.pump for o in self._owned.values())]
        if self._flush_task is not None:
            tasks.append(self._flush_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for o in self._owned.values():
            await o.source.close()
        self._owned.clear()
        await self._close_discovery()
        if self._runner is not None:
            await self._runner.cleanup()
        for c in (self._client, self._pubsub_client):
            if c is not None:
                with contextlib.suppress(Exception):
                    await c.aclose()
        if self._ctx is not None and self._ctx_arg is None:
            self._ctx.destroy(linger=0)
        self._closed.set()

    async def __aenter__(self) -> Listener:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- introspection -----------------------------------------------------------------------

    @property
    def owned_workers(self) -> list[str]:
        return sorted(self._owned)

    @property
    def ready(self) -> bool:
        return self._started and not self._closing and self._redis_ok and self._ticked.is_set()

    def source_stats(self) -> list[SourceStats]:
        return [self._retired, *(o.source.stats for o in self._owned.values())]

    def _metrics_state(self) -> ListenerState:
        live = len(self._ownership.live) if self._ownership else 0
        return ListenerState(self.source_stats(), len(self._owned), live, self.ready)

    def render_metrics(self) -> str:
        """This listener's /metrics body (Prometheus text format 0.0.4)."""
        return render(self.registry)

    # -- ownership ---------------------------------------------------------------------------

    async def _refresh_engines(self) -> None:
        specs: Sequence[EngineSpec] = await self._discovery.engines()
        engines: dict[str, tuple[EngineEndpoint, int]] = {}
        for spec in specs:
            block = spec.block_size or self.settings.block_size
            for ep in spec.endpoints():
                engines[dp_worker_id(ep.worker_id, ep.dp_rank or 0)] = (ep, block)
        self._engines = engines

    async def _discovery_loop(self) -> None:
        changed = getattr(self._discovery, "changed", None)
        while True:
            if isinstance(changed, asyncio.Event):
                # A watching source says when its set changed; the interval stays the bound.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self.settings.discovery_interval_s)
                changed.clear()
            else:
                await asyncio.sleep(self.settings.discovery_interval_s)
            try:
                await self._refresh_engines()
            except Exception as exc:  # keep the last known engines
                self._log.warning("discovery", "worker discovery failed: %s", exc)

    async def _tick_loop(self) -> None:
        interval = max(0.05, self.settings.lease_s / 3)
        lost_at: float | None = None
        while True:
            try:
                await self.tick()
                self._redis_ok = True
                lost_at = None
            except (RedisError, OSError, TimeoutError) as exc:
                self._redis_ok = False
                self.metrics.redis_errors[type(exc).__name__] += 1
                self._log.warning("tick", "ownership tick failed: %s", exc)
                now = time.monotonic()
                lost_at = lost_at or now
                if now - lost_at >= self.settings.lease_s and self._owned:
                    # Our leases have lapsed: another replica may own these workers now.
                    logger.warning("Redis unreachable for a lease: giving up every worker")
                    for wid in list(self._owned):
                        await self._drop(wid)
            except Exception:  # a bug must not stop ownership renewals silently
                logger.exception("ownership tick failed")
            self._ticked.set()
            await asyncio.sleep(interval)

    async def tick(self) -> None:
        """One ownership round: heartbeat, assignment, renewals, takeovers, handovers."""
        own = self._ownership
        assert own is not None
        await own.heartbeat()
        mine = [w for w in self._engines if own.assigned(w)]
        for wid in [w for w in self._owned if w not in mine]:
            await self._drop(wid, release=True)
        leases = await own.acquire(mine)
        for wid, lease in zip(mine, leases, strict=True):
            if lease.held and wid not in self._owned:
                await self._take(wid, lease)
            elif not lease.held and wid in self._owned:
                logger.warning("worker %s: lease held by %s", wid, lease.owner)
                await self._drop(wid)

    async def _take(self, wid: str, lease: OwnerLease) -> None:
        assert self.index is not None and self._ctx is not None
        s = self.settings
        namespaces = {s.model, *lease.models}
        calls = [
            self.index.claim_worker_call(ns, wid, epoch=lease.epoch, ttl_ms=s.record_ttl_ms)
            for ns in sorted(namespaces)
        ]
        claims: list[ClaimResult] = list(await self.index.run_pipeline(calls))
        if not all(c.claimed for c in claims):
            logger.warning("worker %s: a newer owner exists; not taking it", wid)
            return
        ep, block = self._engines[wid]
        st = WorkerState(
            wid,
            lease.epoch,
            block,
            applied={ns: c.seq for ns, c in zip(sorted(namespaces), claims, strict=True)},
            namespaces=set(namespaces),
            keys=KeyCache(s.key_cache_blocks),
            lora_ns=KeyCache(s.key_cache_blocks),
        )
        resume = st.resume_seq()
        src = ZmqEventSource(
            [ep],
            resume={wid: resume} if resume is not None else None,
            replay_timeout=s.replay_timeout_s,
            context=self._ctx,
        )
        await src.start()
        pump = asyncio.create_task(self._pump(st, src), name=f"listener pump {wid}")
        self._owned[wid] = _Owned(st, src, pump)
        self.metrics.takeovers += 1
        logger.info("worker %s: owned (epoch %d, resume %s)", wid, lease.epoch, resume)

    async def _drop(self, wid: str, *, release: bool = False) -> None:
        o = self._owned.pop(wid, None)
        if o is None:
            return
        await self._stop_source(o)
        if release and self._ownership is not None:
            await self._ownership.release([wid])
            self.metrics.handovers += 1
            logger.info("worker %s: handed over", wid)

    async def _stop_source(self, o: _Owned) -> None:
        """Stop the pump and close the source, also when the caller is cancelled meanwhile
        (`close()` cancels a tick that is dropping a worker: the worker is already out of
        ``_owned``, so nothing else would close its sockets)."""
        o.state.active = False
        o.pump.cancel()
        try:
            await asyncio.gather(o.pump, return_exceptions=True)
        finally:
            await o.source.close()
            add_stats(self._retired, o.source.stats)

    def _on_fenced(self, st: WorkerState) -> None:
        o = self._owned.get(st.worker_id)
        if o is not None and o.state is st:
            asyncio.get_running_loop().create_task(self._drop(st.worker_id))

    async def _register_namespace(self, st: WorkerState, model: str) -> None:
        assert self._ownership is not None
        await self._ownership.register_namespace(st.worker_id, model)

    async def _pump(self, st: WorkerState, src: ZmqEventSource) -> None:
        try:
            while True:
                items = await src.get_many(1024)
                if not items:
                    return
                await self._inbox.put_many([(st, it) for it in items])
        except SourceFailedError:
            logger.exception("worker %s: event source failed; re-taking it", st.worker_id)
            asyncio.get_running_loop().create_task(self._drop(st.worker_id, release=True))

    # -- flush ------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        applier = self._applier
        assert applier is not None
        batch = self.settings.apply_batch
        max_blocks = self.settings.apply_max_blocks
        while True:
            items = await self._inbox.get_many(batch, max_blocks)
            if not items:
                return
            t0 = time.perf_counter()
            await applier.apply(items)
            self.metrics.flushes += 1
            self.metrics.flush_seconds += time.perf_counter() - t0

    # -- notices ----------------------------------------------------------------------------

    def _responsible(self, worker: str) -> bool:
        if worker in self._owned:
            return True
        if worker in self._engines:
            return False  # an engine-fed worker: its owner applies its notices
        own = self._ownership
        live = own.live if own is not None else (self.settings.listener_id,)
        return rendezvous_owner(worker, live) == self.settings.listener_id

    async def _notice_loop(self) -> None:
        keys = self.schema.model(self.settings.model)
        channel = keys.notices
        backoff = Backoff(0.1, 5.0)
        first = True
        while True:
            pubsub = None
            sub = self._pubsub_client
            try:
                # A Cluster client learns its nodes on its first command; then one node's
                # plain connection subscribes (notices are published cluster-wide).
                await self._pubsub_client.ping()
                sub = pubsub_client(self._pubsub_client)
                pubsub = sub.pubsub()
                await pubsub.subscribe(channel)
                # Each worker's own channel too: a notice there must name that worker.
                await pubsub.psubscribe(keys.worker_notices_pattern)
                if not first:
                    await self._after_notice_gap()
                first = False
                backoff.reset()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None or msg.get("type") not in ("message", "pmessage"):
                        continue
                    own = msg["type"] == "pmessage"
                    await self._on_notice(msg["data"], _text(msg["channel"]) if own else None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the subscription die: log, back off, retry
                self.metrics.redis_errors[type(exc).__name__] += 1
                self.metrics.notice_reconnects += 1
                if isinstance(exc, (RedisError, OSError)):
                    self._log.warning("notices", "notice subscription lost: %s", exc)
                else:
                    logger.exception("notice subscription failed; retrying")
                await backoff.sleep()
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                if sub is not self._pubsub_client:
                    with contextlib.suppress(Exception):
                        await sub.aclose()

    async def _on_notice(self, data: bytes, own_channel: str | None = None) -> None:
        """Apply one notice; `own_channel` is the worker channel it came on, if it did."""
        try:
            n = decode_notice(data)
            if own_channel is not None:
                prefix = self.schema.model(self.settings.model).worker_notices_prefix
                check_channel(n, own_channel, prefix)
        except NoticeDecodeError as exc:
            self.metrics.notice_errors[exc.kind] += 1
            self._log.warning(f"notice:{exc.kind}", "undecodable notice skipped: %s", exc)
            return
        if not self._responsible(n.worker):
            self.metrics.notices_ignored += 1
            return
        seen = self._noticed.get(n.worker)
        nss = seen[1] if seen else set()
        nss.add(n.lora_name or self.settings.model)
        self._noticed[n.worker] = (time.monotonic(), nss)
        await self._inbox.put_many([(None, n)])

    async def _after_notice_gap(self) -> None:
        """Pub/sub is at-most-once: after a lost subscription, forget what notice-fed
        workers told us (their missed evictions would otherwise stand until expiry)."""
        horizon = time.monotonic() - self.settings.record_ttl_s
        items: list[InboxItem] = []
        for worker, (at, nss) in list(self._noticed.items()):
            if at < horizon:
                del self._noticed[worker]
                continue
            if worker in self._engines or not self._responsible(worker):
                continue
            for ns in nss:
                lora = None if ns == self.settings.model else ns
                items.append((None, Notice("clear", worker, lora_name=lora)))
                self.metrics.clears["notice_gap"] += 1
        if items:
            logger.warning(
                "notice subscription was lost: clearing %d notice-fed workers", len(items)
            )
            await self._inbox.put_many(items)

    # -- HTTP --------------------------------------------------------------------------------

    async def _start_http(self) -> None:
        app = create_app(self)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.metrics_host, self.settings.metrics_port)
        await site.start()
        addrs = self._runner.addresses
        self.metrics_port = int(addrs[0][1]) if addrs else self.settings.metrics_port


def create_app(listener: Listener) -> web.Application:
    """/metrics (Prometheus text), /health (the process is up), /ready (Redis reachable and
    ownership current; 503 while starting, draining or cut off from Redis)."""

    async def metrics(request: web.Request) -> web.Response:
        body = request.app[LISTENER_KEY].render_metrics()
        return web.Response(
            body=body.encode(),
            headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4, "X-Content-Format": "0.0.4"},
        )

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(request: web.Request) -> web.Response:
        lst = request.app[LISTENER_KEY]
        if lst.ready:
            return web.json_response({"status": "ready", "owned_workers": len(lst.owned_workers)})
        return web.json_response({"status": "not ready"}, status=503)

    app = web.Application()
    app[LISTENER_KEY] = listener
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    return app


def run_listener(settings: ListenerSettings) -> int:
    """Run a listener until SIGTERM / SIGINT (which drain it); the CLI's entry point."""

    async def main() -> None:
        listener = Listener(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, listener.stop)
        await listener.run()

    asyncio.run(main())
    return 0
