"""Capped exponential backoff, the one retry pacing the processes and discovery share.

Every loop that retries a remote (the router's Redis reconnect, the listener's script round
trips and notice subscription, the Kubernetes watch) waits ``initial``, then twice as long
after each further failure, never more than ``maximum``, and starts over after a success.
"""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Delays ``initial, 2 * initial, ...`` capped at ``maximum``.

    With ``jitter`` each delay is drawn from ``[d / 2, d]``, so many clients that lost the
    same server do not come back in step (the Kubernetes watch: every router of a fleet
    reconnects to one API server).
    """

    __slots__ = ("_next", "initial", "jitter", "maximum", "rng")

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        jitter: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {initial}, {maximum}")
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.rng = rng or random.Random()
        self._next = initial

    def reset(self) -> None:
        """After a success: the next failure waits ``initial`` again."""
        self._next = self.initial

    def delay(self) -> float:
        """The wait before the next attempt; each call doubles the one after (up to the cap)."""
        d = self._next
        self._next = min(self._next * 2, self.maximum)
        return d * self.rng.uniform(0.5, 1.0) if self.jitter else d

    async def sleep(self) -> None:
        """Wait `delay()` seconds."""
        await asyncio.sleep(self.delay())
