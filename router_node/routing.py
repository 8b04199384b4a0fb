"""The routing step: prompt tokens in, a ranked plan out (lookup, then the pure scorer).

`Router.plan()` hashes the prompt's full blocks, asks the shared index for each candidate's
matched depth and load (round trip 1, skipped by policies that use neither), and calls
`scoring.decide`. When the index is down it ranks by this replica's own in-flight counts
(least-load) with reason ``redis_down``.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kvrouter.index.hashing import BlockHasher
from kvrouter.index.scripts import WorkerLoad
from router_node.errors import not_found, unavailable
from router_node.metrics import Metrics
from router_node.models import BaseModel, ModelCatalogue, Resolved
from router_node.request import ParsedRequest, PromptTokenizer
from router_node.scoring import (
    Candidate,
    Decision,
    PairConfig,
    PairDecision,
    ScoringConfig,
    decide,
    decide_pair,
)
from router_node.settings import RouterSettings
from router_node.shared_index import SharedIndex
from router_node.tiers import tier_credit_blocks
from router_node.tracing import ATTR_CHOSEN, ATTR_POLICY, ATTR_REASON, get_tracer
from router_node.workers import Worker, WorkerPool, relative_speeds

# Policies that read residency or shared load; the others route without a lookup.
_NEEDS_LOOKUP = frozenset({"kv", "prefix_only", "least_load"})

RESERVE_TTL_MS = 30_000
"""Life of a re-check's reservation that no dispatch adopts (the request failed or went to
another worker first and nobody gave it back): longer than any connect, short enough that a
lost one counts as a phantom request for seconds, not for the lease's full ttl."""


RECHECK_MAX_MOVES = 3
"""Most times one re-check moves a request. Each move's new worker is reserved and checked
the same way, since requests that left one worker together pick the same second choice; the
bound keeps a request's extra round trips few when a large burst races (the last choice then
stands, reserved)."""


def current_load(shared: WorkerLoad, worker: Worker) -> tuple[int, int]:
    """A worker's (in-flight requests, queued prefill tokens) for scoring. Shared load comes
    from leases that land a round trip after each dispatch, so a burst of arrivals would all
    see the same "least loaded" worker and pile onto it; this replica's own counts are
    current: take whichever is larger."""
    return (
        max(shared.requests, worker.inflight),
        max(shared.prefill_tokens, worker.prefill_pending),
    )


def _gained_load(before: Sequence[Candidate], after: Sequence[Candidate], worker: str) -> bool:
    """Whether `worker` carries more requests or queued prefill in `after` than in `before`."""
    b = next((c for c in before if c.worker == worker), None)
    a = next((c for c in after if c.worker == worker), None)
    if b is None or a is None:
        return True
    return a.requests > b.requests or a.prefill_tokens > b.prefill_tokens


def new_lease_id() -> str:
    """A lease id unique per request attempt (18 hex digits)."""
    return os.urandom(9).hex()


@dataclass(frozen=True, slots=True)
class Reservation:
    """A lease the re-check took on the chosen worker, waiting for the dispatch to adopt it."""

    worker: str
    lease_id: str
    prefill_tokens: int


@dataclass(frozen=True, slots=True)
class RoutedModel:
    """A request's model, resolved once per request: what the name means (a base model or an
    adapter of one) and everything routing it takes (tokenizer, block hasher, scoring)."""

    resolved: Resolved
    tokenizer: PromptTokenizer | None
    """The base model's tokenizer (an adapter tokenizes like its base); None: route on load."""
    scoring: ScoringConfig

    @property
    def name(self) -> str:
        """The requested name: the index namespace of its blocks."""
        return self.resolved.name

    @property
    def base(self) -> BaseModel:
        return self.resolved.base

    @property
    def lora_name(self) -> str | None:
        return self.resolved.lora_name

    @property
    def hasher(self) -> BlockHasher:
        return self.resolved.base.hasher

    def keys(self, tokens: Any, cache_salt: str | None = None) -> list[int]:
        """Block keys of `tokens` as the engine serving this model hashes them."""
        return self.resolved.keys(tokens, cache_salt=cache_salt)


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
    tier_depths: dict[str, dict[str, int]] = field(default_factory=dict)
    """Worker -> medium -> blocks past its GPU match it holds on that lower tier (capped at
    the useful blocks; only workers with any)."""
    load: dict[str, WorkerLoad] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)
    prompt_tokens: int = 0
    indexed: bool = False
    """True when the decision used the shared index."""
    block_size: int = 16
    """The model's block size (an adapter's is its base model's)."""
    not_loaded: frozenset[str] = frozenset()
    """Candidates that would have to load the request's adapter (any_base_worker)."""
    lora_name: str | None = None
    lora_path: str | None = None
    """Where a worker loads the adapter from (config), for ``/v1/load_lora_adapter``."""
    pair: PairDecision | None = None
    """Set when the fleet is disaggregated (some worker has role prefill) and the policy is
    kv: the prefill/decode choice. ``decision.ranking`` is then the decode pool's ranking."""
    reserved: Reservation | None = None
    """The re-check's lease on the chosen worker (Router.recheck), until a dispatch adopts it
    (RoutingCore.lease) or it is given back (RoutingCore.unreserve)."""

    def matched_blocks(self, worker: str) -> int:
        return min(self.depths.get(worker, 0), self.useful_blocks)

    def matched_tokens(self, worker: str, block_size: int | None = None) -> int:
        return self.matched_blocks(worker) * (block_size or self.block_size)

    def prefill_for(self, worker: str) -> int:
        """Prompt tokens `worker` must prefill (what its lease counts)."""
        return max(0, self.prompt_tokens - self.matched_tokens(worker))


def policy_is_kv(policy: str) -> bool:
    """The P/D split needs the kv policy's view of residency and load; baseline policies
    route whole requests (prefill-only workers then take none)."""
    return policy == "kv"


class Router:
    def __init__(
        self,
        settings: RouterSettings,
        pool: WorkerPool,
        shared: SharedIndex,
        metrics: Metrics,
        rng: random.Random | None = None,
        tokenizers: Mapping[str, PromptTokenizer | None] | None = None,
    ) -> None:
        """`tokenizers`: each base model's tokenizer by name (None or a missing name: no
        tokenizer, the model's text prompts are routed on load alone)."""
        self.settings = settings
        self.pool = pool
        self.shared = shared
        self.metrics = metrics
        self.rng = rng or random.Random()
        # Each replica starts its round-robin at a random position: replicas that all
        # started at 0 would send their first requests (a burst behind a round-robin front)
        # to the same workers in the same order.
        # Drawn from a copy of `rng`, so the draws the policies make stay as they were.
        offset = random.Random()
        offset.setstate(self.rng.getstate())
        self.sequence = offset.randrange(1 << 30)
        self.tracer = get_tracer()
        """Spans of the lookup and the scoring (create_app sets the app's tracer)."""
        self.catalogue: ModelCatalogue = settings.catalogue()
        self.pair_config = PairConfig(
            min_prefill_tokens=settings.pd_min_prefill_tokens,
            saturation_tokens=settings.pd_saturation_tokens,
            transfer_weight=settings.pd_transfer_weight,
            local_max_tokens=settings.pd_local_max_tokens,
        )
        self.configs = {
            name: ScoringConfig(
                block_size=b.block_size,
                prefill_weight=b.prefill_weight,
                queue_weight=b.queue_weight,
                decode_weight=b.decode_weight,
                temperature=b.temperature,
                balance_abs=settings.balance_abs,
                balance_rel=settings.balance_rel,
            )
            for name, b in self.catalogue.bases.items()
        }
        self.tokenizers: dict[str, PromptTokenizer | None] = dict(tokenizers or {})
        self.tier_credits = settings.tier_credit_map

    def resolve(self, model: str) -> RoutedModel | None:
        """What `model` is (a configured base model or adapter, or an adapter a worker
        lists with a configured parent), with its tokenizer and scoring; None when this
        router cannot serve it. The app calls it once per request (parse_request)."""
        resolved = self.catalogue.resolve(model, self.pool.adapter_parent(model))
        if resolved is None:
            return None
        base = resolved.base.name
        return RoutedModel(resolved, self.tokenizers.get(base), self.configs[base])

    def chain(self, req: ParsedRequest, model: RoutedModel) -> list[int]:
        """Block keys of the prompt's full blocks (empty when the prompt is unknown)."""
        if not req.token_ids:
            return []
        tokens = req.token_bytes if req.token_bytes is not None else req.token_ids
        return model.keys(tokens, cache_salt=req.cache_salt)

    async def plan(self, req: ParsedRequest, *, allowed: frozenset[str] | None = None) -> Plan:
        """Rank the workers for `req`, on the model parse_request resolved. Raises APIError
        404 for a model no one serves, 503 when no worker can take it now. `allowed`, when
        given, keeps only the workers whose address (``host:port``) it names (an endpoint
        picker's subset hint)."""
        model = req.resolved if req.resolved is not None else self.resolve(req.model)
        if model is None:
            raise not_found(f"The model `{req.model}` does not exist.", "model", "model_not_found")
        placement = self.settings.lora_placement
        pairs = self.pool.candidates_for(model.resolved, placement, time.monotonic())
        if allowed is not None:
            pairs = [(w, loaded) for w, loaded in pairs if w.address in allowed]
            if not pairs:
                raise unavailable(
                    f"no worker named by the subset hint can serve model {req.model!r}",
                    self.settings.retry_after_s,
                )
        # Prefill-only workers never take a whole request: they answer one token and hand
        # the KV cache over. They are candidates of the prefill leg only (below).
        prefill_only = {w.id for w, _ in pairs if w.role == "prefill"}
        disaggregated = bool(prefill_only) and policy_is_kv(self.settings.policy)
        if not disaggregated:
            pairs = [(w, loaded) for w, loaded in pairs if w.role != "prefill"]
        if not pairs or all(w.role == "prefill" for w, _ in pairs):
            if model.lora_name is not None and not self.pool.lists(model.name):
                where = (
                    "no worker has it loaded"
                    if placement == "loaded_only"
                    else f"no worker of its base model `{model.base.name}` is up"
                )
                raise not_found(
                    f"The LoRA adapter `{model.name}` is not served: {where}.",
                    "model",
                    "model_not_found",
                )
            raise unavailable(
                f"no healthy worker serves model {req.model!r}", self.settings.retry_after_s
            )
        workers = [w for w, _ in pairs]
        # Loading an adapter costs the worker time before its prefill starts: a worker that
        # has it loaded wins at equal load and match (kv policy).
        load_penalty = {
            w.id: float(self.settings.lora_load_cost_blocks) for w, loaded in pairs if not loaded
        }
        config = model.scoring
        bs = model.base.block_size
        n_tokens = len(req.token_ids or ())
        chain = self.chain(req, model)
        useful = max(0, (n_tokens - 1) // bs) if n_tokens else 0
        plan = Plan(
            Decision("", "", ()),
            chain,
            min(useful, len(chain)),
            prompt_tokens=req.prompt_tokens,
            block_size=bs,
            not_loaded=frozenset(load_penalty),
            lora_name=model.lora_name,
            lora_path=self.catalogue.lora_path(model.name),
        )
        policy = self.settings.policy
        result = None
        if policy in _NEEDS_LOOKUP:
            with self.tracer.start_as_current_span("lookup") as span:
                result = await self.shared.lookup(
                    req.model,
                    chain[: plan.useful_blocks],
                    [w.id for w in workers],
                    media=tuple(self.tier_credits),
                )
                span.set_attribute("kvrouter.lookup.blocks", plan.useful_blocks)
                span.set_attribute("kvrouter.lookup.indexed", result is not None)
        if result is not None:
            plan.indexed = True
            plan.depths = result.depths
            if result.tiers:
                for w in workers:
                    td = result.tier_depths(w.id, plan.useful_blocks)
                    if td:
                        plan.tier_depths[w.id] = td
            plan.load = result.load
            empty = WorkerLoad()
            speed = relative_speeds(workers) if self.settings.speed_aware else {}
            cands = [
                Candidate(
                    w.id,
                    plan.matched_blocks(w.id),
                    *current_load(result.load.get(w.id, empty), w),
                    load_penalty.get(w.id, 0.0),
                    speed.get(w.id, 1.0),
                    tier_credit_blocks(plan.tier_depths.get(w.id, {}), self.tier_credits),
                )
                for w in workers
            ]
        else:
            cands = [
                Candidate(w.id, 0, w.inflight, w.prefill_pending, load_penalty.get(w.id, 0.0))
                for w in workers
            ]
        plan.candidates = cands
        with self.tracer.start_as_current_span("score") as span:
            self.sequence += 1
            if disaggregated:
                roles = {w.id: w.role for w in workers}
                pre = [c for c in cands if roles[c.worker] in ("prefill", "both")]
                dec = [c for c in cands if roles[c.worker] in ("decode", "both")]
                pair = decide_pair(pre, dec, n_tokens, config, self.pair_config, self.rng)
                plan.pair = pair
                reason = "redis_down" if result is None else pair.reason
                plan.decision = Decision(policy, reason, pair.decode, pair.costs)
            elif policy in _NEEDS_LOOKUP and result is None:
                d = decide("least_load", cands, n_tokens, config, self.rng)
                plan.decision = Decision(
                    policy, "redis_down" if self.shared.enabled else "local", d.ranking
                )
            else:
                plan.decision = decide(
                    policy,
                    cands,
                    n_tokens,
                    config,
                    self.rng,
                    sequence=self.sequence,
                    session_key=req.session_key,
                )
            d = plan.decision
            span.set_attribute(ATTR_POLICY, d.policy)
            span.set_attribute(ATTR_REASON, d.reason)
            span.set_attribute(ATTR_CHOSEN, d.worker)
        return plan

    # -- the re-check ------------------------------------------------------------------------
    def others_active(self, plan: Plan) -> bool:
        """The lookup saw more requests in flight on some worker than this replica counts
        there: other replicas are routing to this fleet now and may be deciding on the same
        load (or this replica's own releases have not landed yet)."""
        for c in plan.candidates:
            w = self.pool.get(c.worker)
            shared = plan.load.get(c.worker)
            if w is not None and shared is not None and shared.requests > w.inflight:
                return True
        return False

    async def recheck(self, req: ParsedRequest, plan: Plan) -> None:
        """Close the window between a kv decision and its lease landing in Redis.

        Replicas that decide one burst in the same millisecond all read the same shared load,
        so they pick the same worker: each one's lease lands a round trip after its decision.
        Here the lease on the chosen worker is taken *and* every worker's load read in one
        atomic script (a reservation), and the request re-scored on that load: when another
        replica's lease landed first and the chosen worker no longer wins, the reservation
        is given back and the request moves to the new best worker, whose lease is reserved
        the same way (at most RECHECK_MAX_MOVES moves). The request's dispatch adopts the
        reservation.
        ``lease_recheck``: off, on, or auto (only when `others_active`: between bursts a
        replica alone has nothing to re-check against)."""
        mode = self.settings.lease_recheck
        d = plan.decision
        if (
            mode == "off"
            or d.policy != "kv"
            or not plan.indexed
            or plan.pair is not None
            or len(plan.candidates) < 2
            or (mode == "auto" and not self.others_active(plan))
        ):
            return
        model = req.resolved if req.resolved is not None else self.resolve(req.model)
        if model is None:
            return
        n_tokens = len(req.token_ids or ())
        worker = d.worker
        moves = 0
        while True:
            res = Reservation(worker, new_lease_id(), plan.prefill_for(worker))
            with (
                self.tracer.start_as_current_span("recheck") as span,
                self._claimed(worker, res.prefill_tokens),
            ):
                span.set_attribute(ATTR_CHOSEN, worker)
                fresh = await self.shared.reserve(
                    req.model, worker, res.lease_id, res.prefill_tokens, RESERVE_TTL_MS
                )
            if fresh is None:
                return  # the index is down: the decision stands, unreserved
            plan.reserved = res
            if moves == RECHECK_MAX_MOVES:
                return  # the last choice stands, reserved
            cands = self._refreshed(plan, fresh, res)
            if not _gained_load(plan.candidates, cands, worker):
                # Nothing landed on the chosen worker since the load the choice was made on
                # was read. Loads that fell elsewhere meanwhile (releases) are not the race
                # this closes, and moving for them would cost the request its match.
                self.metrics.rechecks.labels("kept").inc()
                return
            again = decide("kv", cands, n_tokens, model.scoring, self.rng)
            costs = again.costs
            if worker not in again.guarded and costs[worker] <= costs[again.worker]:
                self.metrics.rechecks.labels("kept").inc()
                return
            self.metrics.rechecks.labels("moved").inc()
            moves += 1
            plan.reserved = None
            plan.candidates = cands
            plan.decision = again
            # The left worker's reservation goes back before the next one is taken, so the
            # load read with that one no longer counts this request there; meanwhile the
            # request counts where it is going.
            with self._claimed(again.worker, plan.prefill_for(again.worker)):
                await self.shared.release(
                    req.model, worker, res.lease_id, res.prefill_tokens, prefilled_only=False
                )
            worker = again.worker

    @contextlib.contextmanager
    def _claimed(self, worker_id: str, prefill_tokens: int) -> Iterator[None]:
        """Count the request on `worker_id` in this replica's own load while the re-check
        waits for Redis. This replica's other requests of the same burst are decided
        meanwhile; without the claim they see neither this request's lease (taken only when
        it is dispatched) nor, when their lookup was read first, its reservation, and they
        all pick the same worker (one replica on the bundled trace: ten of one 16-request
        burst on one of eight workers). The claim ends before the re-check re-scores (the
        reservation then counts the request) and the dispatch that follows without waiting
        takes the lease."""
        w = self.pool.get(worker_id)
        if w is None:
            yield
            return
        w.inflight += 1
        w.prefill_pending += prefill_tokens
        try:
            yield
        finally:
            w.inflight -= 1
            w.prefill_pending -= prefill_tokens

    def _refreshed(
        self, plan: Plan, fresh: Mapping[str, WorkerLoad], mine: Reservation
    ) -> list[Candidate]:
        """The plan's candidates with the shared load read by the reservation (this request's
        own reservation taken out again), or this replica's own counts where larger."""
        out = []
        empty = WorkerLoad()
        for c in plan.candidates:
            load = fresh.get(c.worker, empty)
            requests, prefill = load.requests, load.prefill_tokens
            if c.worker == mine.worker:
                requests, prefill = requests - 1, prefill - mine.prefill_tokens
            requests, prefill = max(0, requests), max(0, prefill)
            w = self.pool.get(c.worker)
            if w is not None:
                requests, prefill = current_load(WorkerLoad(requests, prefill), w)
            out.append(replace(c, requests=requests, prefill_tokens=prefill))
        return out
