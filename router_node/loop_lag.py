"""How late this replica's event loop runs its callbacks: the lag a benchmark must check.

A router that shares two cores with its load generator and a simulated fleet can fall behind
without failing a request: every request then waits for the loop, and the benchmark measures
the machine rather than the routing. `LoopLagProbe` sleeps a fixed interval again and again
and records how much later than asked each sleep returned, into
``kvrouter_event_loop_lag_seconds`` (a histogram, so a scraper can take its p99 over a run)
and ``kvrouter_event_loop_lag_max_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib

from router_node.metrics import Metrics

DEFAULT_INTERVAL_S = 0.05


class LoopLagProbe:
    """A task that measures the running loop's scheduling lag every `interval_s`."""

    def __init__(self, metrics: Metrics, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.metrics = metrics
        self.interval_s = interval_s
        self.max_lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start probing on the running loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.record(max(0.0, loop.time() - asked))

    def record(self, lag_s: float) -> None:
        """One sample of lag (seconds a callback ran after its due time)."""
        self.metrics.loop_lag.observe(lag_s)
        if lag_s > self.max_lag_s:
            self.max_lag_s = lag_s
            self.metrics.loop_lag_max.set(lag_s)

    async def close(self) -> None:
        """Stop probing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
