"""The router's view of the shared index in Redis, and what it does when Redis is gone.

Per request (the budget is two Redis round trips):

1. `lookup`: one EVALSHA, each candidate's matched depth plus the shared load.
2. `dispatch`: record speculative residency for the chosen worker and take its in-flight
   lease, pipelined into one round trip. The router sends it concurrently with the upstream
   request, so it adds no latency of its own.

Releases (prefill part at the first streamed byte, the rest at the end) run after the
response, off the request's critical path. A retry on another worker costs one more dispatch.

**Redis down.** Any Redis error marks the index down: requests stop calling Redis at all
(no per-request timeouts), the router ranks workers by its own in-flight counts, and one
background task pings Redis with capped exponential backoff. When a ping succeeds the scripts
are loaded again and cache-aware routing resumes. Releases missed while down are dropped;
their leases expire by their TTL. No request fails because Redis did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from kvrouter.backoff import Backoff
from kvrouter.index.connection import connect, redact_url
from kvrouter.index.errors import IndexError_
from kvrouter.index.scripts import (
    LookupResult,
    RecordCall,
    ResidencyIndex,
    ScriptCall,
    WorkerLoad,
)
from router_node.metrics import Metrics
from router_node.settings import RouterSettings

log = logging.getLogger(__name__)

# What a failed Redis call can raise: connection and protocol errors, socket timeouts, and
# our own typed script errors (which would mean a bug, but must not fail a request either).
# RedisClusterException (e.g. SlotNotCoveredError while a Cluster fails over) is not a
# RedisError in redis-py: without it a failover mid-request escaped as a 500.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError, IndexError_)

BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 2.0


class SharedIndex:
    """Residency and load in Redis, with the down/up state machine."""

    def __init__(self, settings: RouterSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.enabled = bool(settings.redis_url)
        self.client: Any = None
        self.index: ResidencyIndex | None = None
        self.up = False
        self.down_since: float | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and load the scripts. A Redis that is down at start is not an error:
        the router starts degraded and the reconnect loop brings the index up later."""
        self.metrics.redis_up.set(0)
        if not self.enabled:
            return
        t = self.settings.redis_timeout_s
        self.client = connect(
            self.settings.redis_connect_url,
            socket_timeout=t,
            socket_connect_timeout=t,
            # Fail fast: a request must not wait out redis-py's default retries with backoff;
            # the reconnect loop below retries instead, off the request path.
            retry=Retry(NoBackoff(), 0),
        )
        self.index = ResidencyIndex(self.client, self.settings.key_schema)
        try:
            await self.index.load()
            self._set_up()
        except REDIS_FAILURES as exc:
            self.mark_down("start", exc)

    async def close(self) -> None:
        self._closing = True
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect
        if self.client is not None:
            with contextlib.suppress(*REDIS_FAILURES):
                await self.client.aclose()

    def _set_up(self) -> None:
        if not self.up:
            log.info("shared index up (%s)", redact_url(self.settings.redis_url))
        self.up = True
        self.down_since = None
        self.metrics.redis_up.set(1)

    def mark_down(self, op: str, exc: BaseException) -> None:
        """Record a failed Redis call and start reconnecting (once)."""
        self.metrics.redis_errors.labels(op).inc()
        if self.up or self.down_since is None:
            log.warning(
                "shared index down (%s failed: %s: %s); routing on local load until it is back",
                op,
                type(exc).__name__,
                exc,
            )
            self.down_since = time.monotonic()
        self.up = False
        self.metrics.redis_up.set(0)
        if not self._closing and (self._reconnect is None or self._reconnect.done()):
            self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        backoff = Backoff(BACKOFF_START_S, BACKOFF_MAX_S)
        assert self.index is not None
        while not self._closing:
            await backoff.sleep()
            try:
                await self.client.ping()
                await self.index.load()
            except REDIS_FAILURES:
                continue
            self._set_up()
            return

    # -- the request path ----------------------------------------------------------------------
    async def lookup(
        self,
        model: str,
        chain: Sequence[int],
        candidates: Sequence[str],
        media: Sequence[str] = (),
    ) -> LookupResult | None:
        """Round trip 1. None when the index is down or the call failed (caller falls back).
        `media`: lower storage tiers to look up too (in the same round trip)."""
        if not self.up or self.index is None:
            return None
        start = time.perf_counter()
        try:
            result = await self.index.lookup_with_tiers(model, chain, media, candidates)
        except REDIS_FAILURES as exc:
            self.mark_down("lookup", exc)
            return None
        self.metrics.lookup_seconds.labels(model).observe(time.perf_counter() - start)
        return result

    async def dispatch(
        self,
        model: str,
        worker: str,
        chain: Sequence[int],
        *,
        held: int,
        capacity: int,
        lease_id: str,
        prefill_tokens: int,
    ) -> bool:
        """Round trip 2: speculative residency plus the in-flight lease, pipelined.
        Returns True when the lease was taken (so it must be released)."""
        if not self.up or self.index is None:
            return False
        s = self.settings
        calls: list[ScriptCall | RecordCall] = [
            self.index.acquire_lease_call(
                model,
                worker,
                lease_id,
                prefill_tokens=prefill_tokens,
                ttl_ms=int(s.lease_ttl_s * 1000),
            )
        ]
        if chain:
            calls.append(
                self.index.record_call(
                    model,
                    worker,
                    chain,
                    ttl_new_ms=s.speculative_ttl_ms,
                    ttl_held_ms=s.record_ttl_ms,
                    held=held,
                    capacity=capacity,
                )
            )
        try:
            await self.index.run_pipeline(calls)
        except REDIS_FAILURES as exc:
            self.mark_down("dispatch", exc)
            return False
        return True

    async def reserve(
        self, model: str, worker: str, lease_id: str, prefill_tokens: int, ttl_ms: int
    ) -> dict[str, WorkerLoad] | None:
        """Take the lease `lease_id` on `worker` for `ttl_ms` and read every worker's shared
        load in one atomic step (the re-check of a decision against the other replicas).
        The request's dispatch later takes the same lease with the full ttl, which adopts it.
        None when the index is down or the call failed (no lease was taken then)."""
        if not self.up or self.index is None:
            return None
        try:
            return await self.index.reserve_lease(
                model, worker, lease_id, prefill_tokens=prefill_tokens, ttl_ms=ttl_ms
            )
        except REDIS_FAILURES as exc:
            self.mark_down("reserve", exc)
            return None

    async def release(
        self, model: str, worker: str, lease_id: str, prefill_tokens: int, *, prefilled_only: bool
    ) -> None:
        if not self.up or self.index is None:
            return  # the lease expires by itself
        try:
            await self.index.release_lease(
                model,
                worker,
                lease_id,
                prefill_tokens=prefill_tokens,
                prefilled_only=prefilled_only,
            )
        except REDIS_FAILURES as exc:
            self.mark_down("release", exc)

    async def correct_chain(
        self,
        model: str,
        worker: str,
        keys: Sequence[int],
        *,
        cut_us: int = 0,
        limit: int = 1024,
    ) -> tuple[int, int] | None:
        """Feedback: drop `keys` from `worker`, and up to `limit` of its records last accessed
        before `cut_us` (on ``server_now_us``'s clock; 0: none) (see correct_chain-3.lua).
        Returns (chain records removed, older records removed); None when Redis is down (the
        correction is dropped, the TTL still applies)."""
        if not self.up or self.index is None:
            return None
        try:
            return await self.index.correct_chain(model, worker, keys, cut_us=cut_us, limit=limit)
        except REDIS_FAILURES as exc:
            self.mark_down("correct_chain", exc)
            return None

    async def used_since(self, model: str, worker: str, since_us: int) -> int | None:
        """Feedback: how many of `worker`'s records were last accessed at or after `since_us`
        (``server_now_us``'s clock); None when Redis is down."""
        if not self.up or self.index is None:
            return None
        try:
            return await self.index.used_since(model, worker, since_us)
        except REDIS_FAILURES as exc:
            self.mark_down("used_since", exc)
            return None

    async def server_now_us(self) -> int | None:
        """Now on the clock the router writes last accesses with (the Redis server's, us);
        None when Redis is down."""
        if not self.up or self.index is None:
            return None
        try:
            return await self.index.server_now_us()
        except REDIS_FAILURES as exc:
            self.mark_down("server_now_us", exc)
            return None

    async def clear_worker(self, model: str, worker: str) -> bool:
        """Forget a worker's residency; False when Redis is down (try again later)."""
        if not self.up or self.index is None:
            return False
        try:
            await self.index.clear_worker(model, worker)
        except REDIS_FAILURES as exc:
            self.mark_down("clear_worker", exc)
            return False
        return True
