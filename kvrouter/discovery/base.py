"""What a discovery source hands the router and the listener: full snapshots of endpoints.

A source never reports deltas. Each snapshot is the whole current set of workers, sorted by
worker id, so a consumer diffs it against what it has (start health checks or ZMQ
subscriptions for new ids, stop them for ids that went away) and a lost update can never leave
it permanently wrong: the next snapshot repairs it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One worker: an engine's HTTP endpoint plus one data-parallel rank.

    ``worker_id`` is the id both the router and the listener use in Redis keys; it must be
    the same string in both, which is why sources build it and consumers never do.
    ``events_endpoint`` / ``replay_endpoint`` are ZMQ addresses (``tcp://ip:port``) of the
    engine's KV-events PUB socket and replay ROUTER socket for this rank, or None when the
    engine publishes no events.
    """

    worker_id: str
    url: str
    events_endpoint: str | None = None
    replay_endpoint: str | None = None
    dp_rank: int = 0
    ready: bool = True
    pod: str | None = None
    role: str = "both"
    """Prefill/decode pool: ``prefill``, ``decode`` or ``both`` (the router reads it)."""


@runtime_checkable
class EndpointSource(Protocol):
    """Anything that yields full snapshots of the workers it knows about.

    ``snapshots()`` yields the first snapshot as soon as it is known and then one more each
    time the set changes (equal consecutive snapshots are not repeated). A source whose set
    can never change (a static list) yields once and ends. Only one iteration at a time;
    ``close()`` is idempotent and ends a running iteration.
    """

    def snapshots(self) -> AsyncIterator[list[Endpoint]]: ...

    async def close(self) -> None: ...


class StaticEndpointSource:
    """A fixed list of endpoints (``KVR_WORKERS`` / ``KVR_ENGINES``): one snapshot, then done."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self._endpoints = sorted(endpoints, key=lambda e: e.worker_id)
        ids = [e.worker_id for e in self._endpoints]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"duplicate worker ids: {', '.join(dupes)}")

    async def snapshots(self) -> AsyncIterator[list[Endpoint]]:
        yield list(self._endpoints)

    async def close(self) -> None:
        return None
