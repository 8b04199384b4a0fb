"""What a hit on a lower storage tier is worth to the kv cost model.

A block the engine offloaded to CPU memory (or disk) is not on the GPU, but loading it back is
far cheaper than recomputing it. The lookup says how far a prompt's chain continues on each
tier past the worker's GPU depth (``LookupResult.tier_depths``); the cost model credits each
such block at a fraction of a GPU hit, per medium (``KVR_TIER_CREDITS``). Defaults come from
the two public anchors #17 cites: llm-d's prefix scorer weighs a CPU hit at 0.8 of a GPU hit,
and Dynamo's router 0.75 for host memory and 0.25 for disk; CPU takes llm-d's figure (vLLM's
offloading connector names its medium "CPU", as llm-d scores it), DISK Dynamo's.
docs/configuration.md ("Storage tiers") has the operator's view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from kvrouter.index.keys import KeyNameError, validate_medium

DEFAULT_TIER_CREDITS: Final = ("CPU=0.8", "DISK=0.25")


def parse_tier_credits(items: Iterable[str]) -> dict[str, float]:
    """``MEDIUM=fraction`` entries to a map; the fraction is in [0, 1] (a tier hit is never
    worth more than a GPU hit). Raises ValueError naming the bad entry."""
    out: dict[str, float] = {}
    for item in items:
        medium, sep, value = item.partition("=")
        medium = medium.strip()
        try:
            validate_medium(medium)
            credit = float(value)
        except (KeyNameError, ValueError):
            raise ValueError(f"{item!r}: expected MEDIUM=fraction, e.g. CPU=0.8") from None
        if not sep or medium == "GPU" or not 0.0 <= credit <= 1.0:
            raise ValueError(f"{item!r}: a lower tier (not GPU) and a fraction in [0, 1]")
        out[medium] = credit
    return out


def tier_credit_blocks(depths: Mapping[str, int], credits: Mapping[str, float]) -> float:
    """Blocks past the GPU depth the engine loads from lower tiers, each weighted by its
    tier's credit: what the cost model subtracts from the prefill work besides GPU hits."""
    return sum(credits.get(m, 0.0) * n for m, n in depths.items())
