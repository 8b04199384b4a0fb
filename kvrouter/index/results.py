"""Decoded replies of the index scripts: what ``ResidencyIndex``'s typed wrappers return."""

from __future__ import annotations

from dataclasses import dataclass

APPLIED = 1
ALREADY_APPLIED = 0
FENCED = -1


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    requests: int = 0
    prefill_tokens: int = 0


@dataclass(frozen=True, slots=True)
class LookupResult:
    depths: dict[str, int]
    """Worker -> blocks of the chain it holds, from the head (only workers with >= 1)."""
    load: dict[str, WorkerLoad]
    probes: int

    def depth(self, worker: str) -> int:
        return self.depths.get(worker, 0)


@dataclass(frozen=True, slots=True)
class RecordResult:
    added: int
    refreshed: int
    evicted: int
    expired: int


@dataclass(frozen=True, slots=True)
class EngineBlock:
    """One block of a BlockStored event, mapped to the router's key."""

    engine_hash: int
    parent_hash: int | None
    router_key: int


@dataclass(frozen=True, slots=True)
class StoreResult:
    stored: int
    duplicates: int
    added: int
    refreshed: int
    evicted: int
    expired: int


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    released: int
    removed: int
    unknown: int
    holes: int


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """Reply of apply_engine_events: ``status`` is APPLIED, ALREADY_APPLIED or FENCED."""

    status: int
    stored: int = 0
    duplicates: int = 0
    released: int = 0
    removed: int = 0
    unknown: int = 0
    holes: int = 0
    clears: int = 0
    added: int = 0
    refreshed: int = 0
    evicted: int = 0
    expired: int = 0


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """Reply of claim_worker: ``claimed`` False means a newer epoch is stored (fenced)."""

    claimed: bool
    seq: int
    """Last engine batch applied for the worker in the model; -1 = no resume point."""


@dataclass(frozen=True, slots=True)
class OwnerLease:
    """Reply of own_worker."""

    held: bool
    """The caller holds the lease (or, for a release, gave it up)."""
    epoch: int
    owner: str
    until_ms: int
    models: tuple[str, ...]
    """Models the worker's events were written under by any owner (where to claim it)."""
