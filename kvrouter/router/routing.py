"""The routing step: prompt tokens in, a ranked plan out (lookup, then the pure scorer).

`Router.plan()` hashes the prompt's full blocks, asks the shared index for each candidate's
matched depth and load (round trip 1, skipped by policies that use neither), and calls
`scoring.decide`. When the index is down it ranks by this replica's own in-flight counts
(least-load) with reason ``redis_down``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from kvrouter.index.hashing import BlockHasher
from kvrouter.index.scripts import WorkerLoad
from kvrouter.router.errors import unavailable
from kvrouter.router.metrics import Metrics
from kvrouter.router.request import ParsedRequest
from kvrouter.router.scoring import Candidate, Decision, ScoringConfig, decide
from kvrouter.router.settings import RouterSettings
from kvrouter.router.shared_index import SharedIndex
from kvrouter.router.workers import WorkerPool

# Policies that read residency or shared load; the others route without a lookup.
_NEEDS_LOOKUP = frozenset({"kv", "prefix_only", "least_load"})


@dataclass(slots=True)
class Plan:
    """Everything the proxy and /debug/route need about one routing decision."""

    decision: Decision
    chain: list[int]
    """Keys of every full block of the prompt (recorded for the chosen worker)."""
    useful_blocks: int
    """Blocks the engine can reuse at most: ``(prompt_tokens - 1) // block_size``."""
    depths: dict[str, int] = field(default_factory=dict)
    """Raw matched depth per worker from the lookup (blocks)."""
    load: dict[str, WorkerLoad] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)
    prompt_tokens: int = 0
    indexed: bool = False
    """True when the decision used the shared index."""

    def matched_blocks(self, worker: str) -> int:
        return min(self.depths.get(worker, 0), self.useful_blocks)

    def matched_tokens(self, worker: str, block_size: int) -> int:
        return self.matched_blocks(worker) * block_size


class Router:
    def __init__(
        self,
        settings: RouterSettings,
        pool: WorkerPool,
        shared: SharedIndex,
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.shared = shared
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.sequence = 0
        self.hashers = {
            m: BlockHasher(m, settings.block_size, settings.hash_seed) for m in settings.models
        }
        self.config = ScoringConfig(
            block_size=settings.block_size,
            prefill_weight=settings.prefill_weight,
            queue_weight=settings.queue_weight,
            decode_weight=settings.decode_weight,
            temperature=settings.temperature,
            balance_abs=settings.balance_abs,
            balance_rel=settings.balance_rel,
        )

    def chain(self, req: ParsedRequest) -> list[int]:
        if not req.token_ids:
            return []
        tokens = req.token_bytes if req.token_bytes is not None else req.token_ids
        return self.hashers[req.model].keys(tokens, cache_salt=req.cache_salt)

    async def plan(self, req: ParsedRequest) -> Plan:
        """Rank the workers for `req`. Raises APIError 503 when none can take it."""
        workers = self.pool.candidates(req.model, time.monotonic())
        if not workers:
            raise unavailable(
                f"no healthy worker serves model {req.model!r}", self.settings.retry_after_s
            )
        bs = self.settings.block_size
        n_tokens = len(req.token_ids or ())
        chain = self.chain(req)
        useful = max(0, (n_tokens - 1) // bs) if n_tokens else 0
        plan = Plan(
            Decision("", "", ()), chain, min(useful, len(chain)), prompt_tokens=req.prompt_tokens
        )
        policy = self.settings.policy
        result = None
        if policy in _NEEDS_LOOKUP:
            result = await self.shared.lookup(
                req.model, chain[: plan.useful_blocks], [w.id for w in workers]
            )
        if result is not None:
            plan.indexed = True
            plan.depths = result.depths
            plan.load = result.load
            empty = WorkerLoad()
            # Shared load comes from leases that land a round trip after each dispatch, so
            # a burst of arrivals would all see the same "least loaded" worker and pile onto
            # it. This replica's own counts are current: take whichever is larger.
            cands = [
                Candidate(
                    w.id,
                    plan.matched_blocks(w.id),
                    max(result.load.get(w.id, empty).requests, w.inflight),
                    max(result.load.get(w.id, empty).prefill_tokens, w.prefill_pending),
                )
                for w in workers
            ]
        else:
            cands = [Candidate(w.id, 0, w.inflight, w.prefill_pending) for w in workers]
        plan.candidates = cands
        self.sequence += 1
        if policy in _NEEDS_LOOKUP and result is None:
            d = decide("least_load", cands, n_tokens, self.config, self.rng)
            plan.decision = Decision(
                policy, "redis_down" if self.shared.enabled else "local", d.ranking
            )
        else:
            plan.decision = decide(
                policy,
                cands,
                n_tokens,
                self.config,
                self.rng,
                sequence=self.sequence,
                session_key=req.session_key,
            )
        return plan
