"""The Redis server's clock as seen from this process."""

from __future__ import annotations

import asyncio
import time
from typing import Any

# How often the offset to the Redis server's clock is read again.
CLOCK_REFRESH_S = 30.0
# An estimate whose error bound is above CLOCK_TIGHT_US is read again after CLOCK_RETRY_S
# instead, up to CLOCK_RETRIES times after first use: the first samples ride on connections
# being opened (connect and handshake come before TIME is sent, which puts the midpoint early
# and the estimate ahead by half the setup: 0.2-2 ms here on a quiet machine, more on a loaded
# one), and one stall can delay all three together; a warm round trip a second later
# replaces it. Bounded because the read is inline (its caller waits one round trip), and on a
# network whose round trip is always over 2 ms no retry gets tighter.
CLOCK_TIGHT_US = 1_000.0
CLOCK_RETRY_S = 1.0
CLOCK_RETRIES = 5
# TIME round trips at first use; the fastest one sets the offset.
CLOCK_SAMPLES = 3
# How fast the two clocks may drift apart (100 ppm: more than the 10-50 ppm of an
# unsynchronised quartz clock), so how fast an estimate's error bound grows with its age.
CLOCK_DRIFT = 1e-4


class ServerClock:
    """Now on the Redis server's clock, in us: this process's monotonic clock plus an offset
    read with TIME.

    The server read its clock somewhere inside the round trip, so taking the round trip's
    midpoint is wrong by at most half of it (Cristian's algorithm). A round trip can be long for
    reasons that have nothing to do with the network: a busy event loop or a garbage collection
    that delays reading the reply skews a midpoint by half the stall (tens of ms), and two
    processes, or two clients of one, would then write and cut records on clocks that disagree
    by as much (see router_node/feedback.py's LRU cut). So the offset comes from the fastest
    of ``CLOCK_SAMPLES`` concurrent round trips at first use, and an estimate carries its
    error bound (half its round trip, growing by ``CLOCK_DRIFT`` with age); the sample taken
    every ``CLOCK_REFRESH_S`` (every ``CLOCK_RETRY_S``, ``CLOCK_RETRIES`` times at most, while
    the bound is looser than ``CLOCK_TIGHT_US``) replaces it only when its own bound is
    tighter. Records written with it expire by the same clock the scripts read, whatever this
    host's wall clock says."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._offset_us: int | None = None
        self._half_rtt_us = 0.0
        self._sampled = 0.0
        """When the offset's sample was taken (monotonic s)."""
        self._checked = 0.0
        self._retries = CLOCK_RETRIES
        """Quick rereads left for a loose estimate."""

    async def now_us(self) -> int:
        """Now on the server's clock, in us (a TIME round trip at most every refresh, and
        ``CLOCK_SAMPLES`` concurrent ones at first use)."""
        mono = time.monotonic()
        if self._offset_us is None:
            self._checked = mono
            # At once, so the first caller (a dispatch's record) waits one round trip, as
            # with a single sample; each keeps its own round trip, and the fastest wins.
            got = await asyncio.gather(
                *(self._sample() for _ in range(CLOCK_SAMPLES)), return_exceptions=True
            )
            if self._offset_us is None:
                failed = next(g for g in got if isinstance(g, BaseException))
                raise failed
        elif mono - self._checked > (refresh := self._refresh_s()):
            self._checked = mono  # one refresh at a time once an offset is known
            if refresh < CLOCK_REFRESH_S:
                self._retries -= 1
            await self._sample()
        offset = self._offset_us
        if offset is None:  # pragma: no cover - every first sample is taken
            raise RuntimeError("no TIME sample taken")
        return int(time.monotonic() * 1_000_000) + offset

    def _refresh_s(self) -> float:
        """How long after the last read the offset is read again."""
        if self._half_rtt_us > CLOCK_TIGHT_US and self._retries > 0:
            return CLOCK_RETRY_S
        return CLOCK_REFRESH_S

    def error_us(self, at: float | None = None) -> float:
        """The bound on the offset's error at monotonic time `at` (default now), in us;
        infinite before the first sample."""
        if self._offset_us is None:
            return float("inf")
        age = (time.monotonic() if at is None else at) - self._sampled
        return self._half_rtt_us + max(0.0, age) * 1e6 * CLOCK_DRIFT

    async def _sample(self) -> None:
        t0 = time.monotonic()
        reply = await self.client.time()
        t1 = time.monotonic()
        if isinstance(reply, dict):  # a Cluster answers per node: any one will do
            reply = next(iter(reply.values()))
        sec, usec = reply
        half_rtt_us = (t1 - t0) * 500_000
        if half_rtt_us <= self.error_us(t1):
            self._offset_us = int(sec) * 1_000_000 + int(usec) - int((t0 + t1) * 500_000)
            self._half_rtt_us = half_rtt_us
            self._sampled = t1
