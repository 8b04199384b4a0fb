"""Drives a `Scheduler` in real time: simulated durations divided by the time scale.

Simulated time is tied to the event loop's clock (`now_s = (loop.time() - t0) * scale`).
A busy engine runs steps back to back in simulated time and sleeps until each one's end in
real time; an engine that falls more than 50 ms (real) behind, because the CPU cannot keep
up, restarts its clock from "now", so it slows down rather than bunching steps up.

Runs of identical decode steps are slept through as one span of at most `max_span_real_s`
real seconds, and cut at the next step boundary when a request arrives or leaves, so the
loop wakes a few dozen times a second per busy worker rather than once per simulated step.
Tokens of such a span reach the client together at its end; a first token never waits,
since it always comes out of a (single) prefill step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Callable, Sequence

from kvrouter.sim.events import KVEvent
from kvrouter.sim.scheduler import EngineConfig, Scheduler, SimRequest, StepOutcome

log = logging.getLogger(__name__)

TTFT_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip


class Histogram:
    """A cumulative Prometheus histogram (observations in simulated seconds)."""

    __slots__ = ("buckets", "count", "counts", "total")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) pairs, without the +Inf bucket."""
        return list(zip(self.buckets, itertools.accumulate(self.counts), strict=True))


class Engine:
    """One simulated worker's engine loop. Start `run()` as a task; `close()` to stop."""

    def __init__(
        self,
        cfg: EngineConfig,
        root: bytes,
        *,
        time_scale: float = 1.0,
        max_span_real_s: float = 0.02,
        on_events: Callable[[Sequence[KVEvent]], object] | None = None,
    ) -> None:
        self.scheduler = Scheduler(cfg, root)
        self.time_scale = time_scale
        self.max_span_real_s = max_span_real_s
        self.on_events = on_events
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.e2e = Histogram(TTFT_BUCKETS_S)
        self._ids = itertools.count()
        self._t0: float | None = None
        self._sim_s = 0.0
        self._interrupt: asyncio.Future[bool] | None = None
        self._closed = False
        self._max_lag_s = 0.05 * time_scale

    # -- clock ---------------------------------------------------------------------------

    def now_s(self) -> float:
        """Current simulated time (seconds since the engine started)."""
        loop = asyncio.get_running_loop()
        if self._t0 is None:
            self._t0 = loop.time()
        return (loop.time() - self._t0) * self.time_scale

    def _real_at(self, sim_s: float) -> float:
        assert self._t0 is not None
        return self._t0 + sim_s / self.time_scale

    # -- requests ------------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        *,
        root: bytes | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        remote_tokens: int = 0,
    ) -> SimRequest:
        """Queue a request; raises RequestRejected if it can never run on this worker.
        `remote_tokens`: leading prompt tokens whose KV was pulled from a prefill worker."""
        req = self.scheduler.add(
            f"{next(self._ids)}",
            prompt,
            max_tokens,
            self.now_s(),
            root=root,
            lora_name=lora_name,
            cache_salt=cache_salt,
        )
        req.notify = asyncio.Event()
        req.remote_tokens = remote_tokens
        self._wake()
        return req

    def abort(self, req: SimRequest, error: str | None = None) -> None:
        """Drop a request (client gone); frees its blocks at once."""
        if not req.done:
            self.scheduler.abort(req, error)
            self._signal(req)
            self._wake()

    def restart(self) -> int:
        """Simulate an engine restart: every request fails, the cache is empty, silently.
        Returns how many requests it aborted."""
        victims = self.scheduler.restart()
        for req in victims:
            self._signal(req)
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.e2e = Histogram(TTFT_BUCKETS_S)
        self._wake()
        return len(victims)

    def reset_prefix_cache(self) -> bool:
        """vLLM's reset_prefix_cache: False while requests hold blocks; else AllBlocksCleared."""
        ok = self.scheduler.cache.reset_prefix_cache()
        self._flush_events()
        return ok

    # -- loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """The engine loop; returns after `close()`."""
        sched = self.scheduler
        self.now_s()
        idle = True
        while not self._closed:
            if not sched.has_work:
                idle = True
                await self._wait(None)
                continue
            now = self.now_s()
            # Back to back while busy and keeping up, so loop wake-up latency (multiplied by
            # the time scale) does not stretch every step; from "now" after idling or when
            # the CPU has fallen behind.
            start = now if idle or now - self._sim_s >= self._max_lag_s else self._sim_s
            # Evictions made while planning stay buffered: they go out in this step's batch,
            # as vLLM drains its event queue once per step.
            plan = sched.plan(self.max_span_real_s * self.time_scale)
            if plan is None:
                # Only waiting requests that do not fit yet; a finish or abort will wake us.
                idle = True
                await self._wait(None)
                continue
            idle = False
            repeats = plan.max_repeats
            end = start + plan.step_s * repeats
            if repeats > 1 and await self._wait(self._real_at(end)):
                # A request arrived or left mid-span: stop at the next step boundary.
                elapsed = max(0.0, self.now_s() - start)
                repeats = min(repeats, max(1, math.ceil(elapsed / plan.step_s)))
                end = start + plan.step_s * repeats
                await self._wait(self._real_at(end), interruptible=False)
            elif repeats == 1:
                await self._wait(self._real_at(end), interruptible=False)
            self._sim_s = end
            outcome = sched.execute(plan, repeats, end)
            self._flush_events()
            self._deliver(outcome)

    def close(self) -> None:
        """Stop the loop and fail every request still in it. Idempotent."""
        self._closed = True
        for req in self.scheduler.abort_all("server shutting down"):
            self._signal(req)
        self._wake()

    # -- internals -----------------------------------------------------------------------

    def _deliver(self, outcome: StepOutcome) -> None:
        for req in outcome.first_tokens:
            assert req.first_token_s is not None
            self.ttft.observe(req.first_token_s - req.arrival_s)
        for req in outcome.finished:
            assert req.finish_s is not None
            self.e2e.observe(req.finish_s - req.arrival_s)
        for req in outcome.progressed:
            self._signal(req)

    def _flush_events(self) -> None:
        events = self.scheduler.cache.take_events()
        if events and self.on_events is not None:
            self.on_events(events)

    @staticmethod
    def _signal(req: SimRequest) -> None:
        if isinstance(req.notify, asyncio.Event):
            req.notify.set()

    def _wake(self) -> None:
        fut = self._interrupt
        if fut is not None and not fut.done():
            fut.set_result(True)

    async def _wait(self, until_real: float | None, *, interruptible: bool = True) -> bool:
        """Sleep until a loop time (None = until woken). True if woken early."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        handle = None
        if until_real is not None:
            handle = loop.call_at(until_real, _resolve, fut)
        if interruptible:
            self._interrupt = fut
        try:
            return await fut
        finally:
            if handle is not None:
                handle.cancel()
            if self._interrupt is fut:
                self._interrupt = None


def _resolve(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)
