"""Which listener replica applies which worker's events, coordinated through Redis.

* Heartbeats: each replica writes its model's ``<prefix>:{<model>}:listeners`` (ZSET listener
  id -> ms) every tick; replicas whose heartbeat is older than the lease are not live. The live
  set is per base model: a listener only discovers its own model's engines, so the replicas
  that split them are those of the same model (one listener Deployment per model).
* Assignment: rendezvous hashing (highest xxh3 of ``listener|worker`` among live replicas).
  Every replica computes the same answer from the same live set, workers spread evenly, and
  a replica joining or leaving moves only the workers it wins or held.
* Leases: the assigned replica takes the worker's lease (``own_worker-1``: owner, until,
  epoch) and renews it every tick; a replica that is no longer assigned releases it at once.
  A dead replica's leases lapse after ``lease_s``; the next assignee then takes over with a
  higher epoch, claims the worker in every model namespace (``claim_worker-1``: from then on
  the old owner's writes are refused) and resumes from the stored stream position.

So at any time at most one replica's writes land for a worker (the epoch fences a paused
old owner), and a worker is unowned for at most about one lease after its owner dies.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import xxhash

from kvrouter.index.keys import KeySchema
from kvrouter.index.scripts import OwnerLease, ResidencyIndex


def rendezvous_owner(worker: str, listeners: Iterable[str]) -> str | None:
    """The live listener that should own ``worker`` (None if there are none)."""
    best: str | None = None
    best_score = -1
    for lid in listeners:
        score = xxhash.xxh3_64_intdigest(f"{lid}|{worker}".encode())
        if score > best_score or (score == best_score and best is not None and lid < best):
            best, best_score = lid, score
    return best


class Ownership:
    """One replica's view: heartbeat, live set, and lease calls (batched per tick)."""

    def __init__(
        self,
        index: ResidencyIndex,
        schema: KeySchema,
        listener_id: str,
        lease_ms: int,
        model: str,
    ) -> None:
        self.index = index
        self.client: Any = index.client
        self.schema = schema
        self.live_key = schema.model(model).listeners
        self.listener_id = listener_id
        self.lease_ms = lease_ms
        self.live: tuple[str, ...] = (listener_id,)

    async def heartbeat(self) -> tuple[str, ...]:
        """Record this replica alive; return the live replicas (self included)."""
        now = int(time.time() * 1000)
        key = self.live_key
        await self.client.zadd(key, {self.listener_id: now})
        # Forget replicas silent for far longer than a lease (keeps the ZSET small).
        await self.client.zremrangebyscore(key, "-inf", now - 100 * self.lease_ms)
        raw = await self.client.zrangebyscore(key, now - self.lease_ms, "+inf")
        live = {r.decode() if isinstance(r, bytes) else str(r) for r in raw}
        live.add(self.listener_id)
        self.live = tuple(sorted(live))
        return self.live

    async def leave(self) -> None:
        """Drop out of the live set (a draining replica stops attracting workers)."""
        await self.client.zrem(self.live_key, self.listener_id)

    def assigned(self, worker: str) -> bool:
        return rendezvous_owner(worker, self.live) == self.listener_id

    async def acquire(self, workers: Sequence[str]) -> list[OwnerLease]:
        """Acquire or renew each worker's lease (one round trip)."""
        calls = [
            self.index.own_worker_call(w, self.listener_id, lease_ms=self.lease_ms) for w in workers
        ]
        return list(await self.index.run_pipeline(calls)) if calls else []

    async def release(self, workers: Sequence[str]) -> None:
        calls = [self.index.own_worker_call(w, self.listener_id, release=True) for w in workers]
        if calls:
            await self.index.run_pipeline(calls)

    async def register_namespace(self, worker: str, model: str) -> None:
        """Note on the worker's lease that its events were written under ``model``."""
        await self.client.hset(self.schema.listener_owner(worker), f"ns:{model}", 1)
