"""Decoded replies of the index scripts: what ``ResidencyIndex``'s typed wrappers return."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    tiers: dict[str, dict[str, str]] = field(default_factory=dict)
    """Medium -> worker -> one character per chain block, "1" where the worker holds it live
    on that lower tier (lookup_tiers; empty when the lookup asked for no tier)."""

    def depth(self, worker: str) -> int:
        return self.depths.get(worker, 0)

    def tier_depths(self, worker: str, limit: int | None = None) -> dict[str, int]:
        """Blocks past the worker's GPU depth, per medium, that the engine can load from a
        lower tier instead of recomputing: the chain continues while the next block is on
        some tier, and each block counts for the first medium (in lookup order) holding
        it. `limit` caps GPU depth plus tier blocks (the blocks the engine can reuse)."""
        return continue_on_tiers(self.depth(worker), self.tiers, worker, limit)


def continue_on_tiers(
    gpu_depth: int, tiers: dict[str, dict[str, str]], worker: str, limit: int | None = None
) -> dict[str, int]:
    """See ``LookupResult.tier_depths`` (a function of its own so tests and the simulator
    can state the rule without a lookup)."""
    held = [(m, by_worker[worker]) for m, by_worker in tiers.items() if worker in by_worker]
    out: dict[str, int] = {}
    if not held:
        return out
    end = len(held[0][1]) if limit is None else min(limit, len(held[0][1]))
    i = gpu_depth
    while i < end:
        for medium, bits in held:
            if bits[i] == "1":
                out[medium] = out.get(medium, 0) + 1
                break
        else:
            break
        i += 1
    return out


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
class TierResult:
    """Reply of store_tier_blocks."""

    stored: int
    removed: int
    unknown: int
    trimmed: int


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
