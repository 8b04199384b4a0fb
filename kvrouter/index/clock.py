"""The Redis server's clock as seen from this process."""

from __future__ import annotations

import time
from typing import Any

# How often the offset to the Redis server's clock is read again.
CLOCK_REFRESH_S = 30.0


class ServerClock:
    """Now on the Redis server's clock, in us: the local clock plus an offset read with TIME
    at first use and every CLOCK_REFRESH_S. Records written with it expire by the same clock
    the scripts read, whatever this host's clock says."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._offset_us: int | None = None
        self._checked = 0.0

    async def now_us(self) -> int:
        """Now on the server's clock, in us (one TIME round trip at most every refresh)."""
        mono = time.monotonic()
        if self._offset_us is None or mono - self._checked > CLOCK_REFRESH_S:
            self._checked = mono  # one refresh at a time once an offset is known
            t0 = time.time()
            reply = await self.client.time()
            t1 = time.time()
            if isinstance(reply, dict):  # a Cluster answers per node: any one will do
                reply = next(iter(reply.values()))
            sec, usec = reply
            self._offset_us = int(sec) * 1_000_000 + int(usec) - int((t0 + t1) * 500_000)
        return int(time.time() * 1_000_000) + self._offset_us
