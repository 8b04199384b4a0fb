"""Lower storage tiers: blocks an engine reports on a medium other than the GPU.

vLLM's KV offloading (the CPU offloading connector, LMCache and other connectors) publishes
``BlockStored``/``BlockRemoved`` with ``medium`` "CPU" (or the connector's name) through the
same event stream as the GPU's blocks. Such a block is not on the GPU, but loading it back is
far cheaper than a recompute, so it is indexed in the worker's tier of that medium
(``store_tier_blocks``), apart from its GPU records: a removal on a medium drops that tier's
record only, and a GPU eviction leaves the tier copy.

The applier finds the router key of each such block and hands it here; this module collects
one flush's tier ops per (worker, namespace, medium) and turns them into script calls sent in
the flush's round trip. Offload events usually carry no token ids (vLLM's CPU connector sends
hashes only): their router keys come from the GPU event that stored the same engine hash
earlier (the worker's local key cache), and a block the cache does not know is skipped as an
orphan.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from kvrouter.index.keys import KeyNameError, validate_medium
from kvrouter.index.scripts import ResidencyIndex, ScriptCall, pack_u64

GPU: Final = "GPU"


def lower_tier(medium: str | None) -> str | None:
    """The medium when events on it belong to a lower tier: not None (older engines, GPU),
    not "GPU", and usable in a key name; else None."""
    if medium is None or medium == GPU:
        return None
    try:
        return validate_medium(medium)
    except KeyNameError:
        return None


@dataclass(slots=True)
class TierOps:
    ops: list[str] = field(default_factory=list)
    fields: list[int] = field(default_factory=list)


@dataclass(slots=True)
class TierFlush:
    """One flush's tier ops, in event order per (worker, namespace, medium)."""

    by_target: dict[tuple[str, str, str], TierOps] = field(default_factory=dict)

    def _ops(self, worker: str, ns: str, medium: str) -> TierOps:
        t = self.by_target.get((worker, ns, medium))
        if t is None:
            t = self.by_target[(worker, ns, medium)] = TierOps()
        return t

    def store(self, worker: str, ns: str, medium: str, pairs: Iterable[tuple[int, int]]) -> int:
        """Stores of (engine hash, router key) pairs; returns how many."""
        t = self._ops(worker, ns, medium)
        n = 0
        for h, k in pairs:
            t.ops.append("S")
            t.fields += (h, k)
            n += 1
        return n

    def remove(self, worker: str, ns: str, medium: str, hashes: Iterable[int]) -> None:
        """Removals on the tier, by engine hash (the script maps them to block keys)."""
        t = self._ops(worker, ns, medium)
        for h in hashes:
            t.ops.append("D")
            t.fields.append(h)

    def clear(self, worker: str, ns: str, medium: str) -> None:
        """Drop everything the worker holds on the tier (events were lost)."""
        self._ops(worker, ns, medium).ops.append("C")

    def calls(self, index: ResidencyIndex, *, ttl_ms: int, capacity: int) -> list[ScriptCall]:
        """One store_tier_blocks call per target. Tier records live as long as the GPU
        records the listener writes (``ttl_ms``) and are bounded by the same capacity."""
        return [
            index.store_tier_blocks_call(
                ns,
                worker,
                medium,
                "".join(t.ops),
                pack_u64(t.fields),
                ttl_ms=ttl_ms,
                capacity=capacity,
            )
            for (worker, ns, medium), t in self.by_target.items()
            if t.ops
        ]
