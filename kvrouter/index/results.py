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
    tiers: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    """Medium -> worker -> (its GPU depth as the tier lookup saw it, consecutive blocks from
    there held live on that lower tier); lookup_tiers, empty when no tier was asked for."""

    def depth(self, worker: str) -> int:
        return self.depths.get(worker, 0)

    def tier_depths(self, worker: str, limit: int | None = None) -> dict[str, int]:
        """Blocks past the worker's GPU depth, per medium, that the engine can load from a
        lower tier instead of recomputing. See ``continue_on_tiers``."""
        return continue_on_tiers(self.depth(worker), self.tiers, worker, limit)


def continue_on_tiers(
    gpu_depth: int,
    tiers: dict[str, dict[str, tuple[int, int]]],
    worker: str,
    limit: int | None = None,
) -> dict[str, int]:
    """Per medium (in lookup order), the blocks past `gpu_depth` it adds to the run: each
    tier's run starts right after the GPU prefix, and a block counts for the first medium
    whose run reaches it (tiers nest: what a later medium adds is its run beyond the earlier
    ones'). A run seen past another GPU depth (the lookup cut the GPU match at a hole) is not
    used: the blocks right after the cut are unknown. `limit` caps GPU depth plus tier
    blocks (the blocks the engine can reuse)."""
    out: dict[str, int] = {}
    covered = 0
    cap = None if limit is None else max(0, limit - gpu_depth)
    for medium, by_worker in tiers.items():
        seen = by_worker.get(worker)
        if seen is None or seen[0] != gpu_depth:
            continue
        run = seen[1] if cap is None else min(seen[1], cap)
        if run > covered:
            out[medium] = run - covered
            covered = run
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
