"""Routing policies as one pure function: candidates in, a ranked decision out.

`decide()` touches no I/O, no clock and no global state: the caller passes the randomness
(`rng`), the round-robin position (`sequence`) and everything it looked up. The first worker
of `Decision.ranking` gets the request; the rest are the order in which a request that fails
before its first byte is retried.

The default ``kv`` policy is a cost model, in blocks of prefill work::

    cost(w) = prefill_weight * (blocks w must prefill + queue_weight * w's queued prefill blocks)
            + decode_weight  * w's in-flight requests

where a block w holds on a lower storage tier (offloaded to CPU memory or disk, past its GPU
match) counts as a fraction of a hit (``tier_credits``, router_node/tiers.py).

``queue_weight`` (default 0.5) counts another request's queued prefill at half the weight of
this request's own: leaving a worker that holds the conversation costs more than this request's
prefill (the next turn misses too), and on the Mooncake trace full weight moved half the
continuations away (0.72 of the pooled-cache ideal against 0.90 at 0.5, TTFT no worse; see
docs/benchmarks.md). Lowest cost wins, exact ties broken at random; with ``temperature > 0``
the choice is sampled with probability proportional to ``exp(-(cost - min cost) / temperature)``.

**The hot-spot guard.** A prefix held by one worker pulls every request that shares it (a
system prompt) onto that worker: its cost stays lowest until its decode load outweighs the
whole prefix, and meanwhile no other worker ever gets the prefix, so the pull never ends. The
guard caps load imbalance: a worker may be chosen for its cache only while its in-flight
requests do not exceed the least-loaded candidate's by more than
``max(balance_abs, (balance_rel - 1) * least)``. Workers over that line are ranked after the
others (still usable for retries). So no worker leads the least-loaded one by more than that
bound plus one, whatever the prefixes say; the overflow lands on other workers, which then
hold the shared prefix too (speculative records), and from then on the shared part costs
every worker the same and only the conversation-specific match decides. Crediting only the
match "beyond what most workers share" was considered and left out: subtracting the same
depth from every worker that holds it changes no ranking (costs shift by a constant), so it
cannot stop the pull, while the load cap does and is simple to state and test.

Baselines for comparison: ``round_robin``, ``random``, ``least_load`` (in-flight requests,
then queued prefill), ``prefix_only`` (longest match, no load term: the policy that melts a
worker) and ``session`` (rendezvous hash of a session key, least_load without one).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import xxhash

POLICIES = ("kv", "round_robin", "random", "least_load", "prefix_only", "session")
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Candidate:
    """One worker as the scorer sees it."""

    worker: str
    matched_blocks: int = 0
    """Blocks of the prompt the worker holds that the engine will reuse (already capped at
    ``(prompt_tokens - 1) // block_size``: vLLM always computes the last token)."""
    requests: int = 0
    """In-flight requests on the worker (shared across router replicas)."""
    prefill_tokens: int = 0
    """Prompt tokens queued on the worker that have not produced a first token yet."""
    setup_blocks: float = 0.0
    """Work, in prefill blocks, the worker must do before this request's prefill (loading a
    LoRA adapter it does not hold); the kv policy adds it to the cost."""
    speed: float = 1.0
    """The worker's prefill speed over the fleet's mean (2.0: prefills twice as fast). The kv
    cost divides its prefill work by it, so the cost is predicted time to first token in
    units of "one block at the fleet's mean speed"; 1.0 when unknown or not speed-aware."""
    tier_blocks: float = 0.0
    """Blocks past ``matched_blocks`` the engine loads from a lower storage tier (CPU memory,
    disk), each weighted by its tier's credit, a fraction of a GPU hit (router_node/tiers.py):
    the kv cost counts them as that much less prefill."""


@dataclass(frozen=True, slots=True)
class ScoringConfig:
    """The knobs of `decide` (all from RouterSettings)."""

    block_size: int = 16
    prefill_weight: float = 1.0
    queue_weight: float = 0.5
    decode_weight: float = 2.0
    temperature: float = 0.0
    balance_abs: int = 8
    balance_rel: float = 2.0


@dataclass(frozen=True, slots=True)
class Decision:
    policy: str
    reason: str
    """Why the first worker won: prefix, no_match, load, guard, least_load, random,
    round_robin, session, no_session."""
    ranking: tuple[str, ...]
    costs: Mapping[str, float] = field(default_factory=dict)
    guarded: tuple[str, ...] = ()
    """Workers the hot-spot guard held back (kv only)."""

    @property
    def worker(self) -> str:
        return self.ranking[0]


def kv_cost(c: Candidate, prompt_tokens: int, cfg: ScoringConfig) -> float:
    """The kv policy's cost of sending a `prompt_tokens` prompt to `c` (blocks of work)."""
    own = max(0.0, prompt_tokens - (c.matched_blocks + c.tier_blocks) * cfg.block_size)
    prefill_blocks = (own + cfg.queue_weight * c.prefill_tokens) / cfg.block_size
    prefill = (prefill_blocks + c.setup_blocks) / c.speed
    return cfg.prefill_weight * prefill + cfg.decode_weight * c.requests


def guard_limit(least_requests: int, cfg: ScoringConfig) -> float:
    """The most in-flight requests a worker may have and still win on its cache."""
    return least_requests + max(cfg.balance_abs, (cfg.balance_rel - 1.0) * least_requests)


def decide(
    policy: str,
    candidates: Sequence[Candidate],
    prompt_tokens: int,
    cfg: ScoringConfig,
    rng: random.Random,
    *,
    sequence: int = 0,
    session_key: str | None = None,
) -> Decision:
    """Rank `candidates` for one request under `policy`. Raises ValueError when there are
    none or the policy is unknown. Deterministic for a given `rng` state."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    if policy == "kv":
        return _kv(candidates, prompt_tokens, cfg, rng)
    if policy == "least_load":
        return _least_load(candidates, rng, "least_load")
    if policy == "prefix_only":
        return _prefix_only(candidates, rng)
    if policy == "random":
        order = [c.worker for c in candidates]
        rng.shuffle(order)
        return Decision(policy, "random", tuple(order))
    if policy == "round_robin":
        order = sorted(c.worker for c in candidates)
        k = sequence % len(order)
        return Decision(policy, "round_robin", tuple(order[k:] + order[:k]))
    if policy == "session":
        if not session_key:
            d = _least_load(candidates, rng, "no_session")
            return Decision("session", d.reason, d.ranking)
        order = sorted(
            (c.worker for c in candidates),
            key=lambda w: xxhash.xxh3_64_intdigest(f"{session_key}\0{w}".encode()),
            reverse=True,
        )
        return Decision(policy, "session", tuple(order))
    raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")


def _tiebreak(rng: random.Random, n: int) -> list[float]:
    return [rng.random() for _ in range(n)]


def _least_load(candidates: Sequence[Candidate], rng: random.Random, reason: str) -> Decision:
    ties = _tiebreak(rng, len(candidates))
    order = sorted(
        range(len(candidates)),
        key=lambda i: (candidates[i].requests, candidates[i].prefill_tokens, ties[i]),
    )
    return Decision("least_load", reason, tuple(candidates[i].worker for i in order))


def _prefix_only(candidates: Sequence[Candidate], rng: random.Random) -> Decision:
    ties = _tiebreak(rng, len(candidates))
    order = sorted(
        range(len(candidates)),
        key=lambda i: (-candidates[i].matched_blocks, candidates[i].requests, ties[i]),
    )
    best = candidates[order[0]]
    reason = "prefix" if best.matched_blocks > 0 else "no_match"
    return Decision("prefix_only", reason, tuple(candidates[i].worker for i in order))


def _kv(
    candidates: Sequence[Candidate], prompt_tokens: int, cfg: ScoringConfig, rng: random.Random
) -> Decision:
    costs = [kv_cost(c, prompt_tokens, cfg) for c in candidates]
    limit = guard_limit(min(c.requests for c in candidates), cfg)
    held = [c.requests > limit for c in candidates]
    ties = _tiebreak(rng, len(candidates))
    # Eligible first, then by cost, exact ties at random.
    order = sorted(range(len(candidates)), key=lambda i: (held[i], costs[i], ties[i]))
    if cfg.temperature > 0:
        eligible = [i for i in order if not held[i]]
        first = _sample(eligible, costs, cfg.temperature, rng)
        order = [first, *(i for i in order if i != first)]
    chosen = candidates[order[0]]
    best_match = max(c.matched_blocks for c in candidates)
    if best_match == 0:
        reason = "no_match"
    elif chosen.matched_blocks == best_match:
        reason = "prefix"
    elif any(held[i] and candidates[i].matched_blocks > chosen.matched_blocks for i in order):
        reason = "guard"
    else:
        reason = "load"
    return Decision(
        "kv",
        reason,
        tuple(candidates[i].worker for i in order),
        {candidates[i].worker: costs[i] for i in range(len(candidates))},
        tuple(candidates[i].worker for i in order if held[i]),
    )


def _sample(
    indices: Sequence[int], costs: Sequence[float], temperature: float, rng: random.Random
) -> int:
    low = min(costs[i] for i in indices)
    weights = [math.exp(-(costs[i] - low) / temperature) for i in indices]
    total = sum(weights)
    x = rng.random() * total
    for i, w in zip(indices, weights, strict=True):
        x -= w
        if x <= _EPS:
            return i
    return indices[-1]


# -- prefill/decode disaggregation -----------------------------------------------------------

PAIR_REASONS = ("split", "short_suffix", "prefill_saturated", "no_prefill_worker")


@dataclass(frozen=True, slots=True)
class PairConfig:
    """The knobs of `decide_pair` (from RouterSettings)."""

    min_prefill_tokens: int = 256
    """Split only when the decode worker's uncached suffix has at least this many tokens:
    below it, a local prefill costs less than the extra hop and the KV transfer."""
    saturation_tokens: int = 0
    """The prefill pool is saturated when every prefill worker has at least this many prompt
    tokens queued; then requests run whole on the decode worker. 0 = never saturated."""
    transfer_weight: float = 0.1
    """Cost of pulling one block from the prefill worker, against computing it (1.0)."""
    local_max_tokens: int = 0
    """With the prefill pool saturated, only a request whose uncached suffix is at most this
    many tokens runs whole on the decode worker; a longer one still takes the prefill hop and
    queues. A local prefill stalls every decode batched with its chunks, for longer the longer
    the suffix: this bounds the stall the saturation fallback brings back. 0 = any suffix."""


@dataclass(frozen=True, slots=True)
class PairDecision:
    """Where one request goes under prefill/decode disaggregation."""

    split: bool
    """True: prefill leg on ``prefill[0]``, decode leg on ``decode[0]``. False: the whole
    request on ``decode[0]`` (``prefill`` is then empty)."""
    reason: str
    """One of `PAIR_REASONS`: split, short_suffix, prefill_saturated, no_prefill_worker."""
    prefill: tuple[str, ...]
    """Prefill workers, best first (the rest are the fallbacks of a failed prefill leg)."""
    decode: tuple[str, ...]
    """Decode workers, best first (fallbacks of a decode leg that fails before its first byte)."""
    suffix_tokens: int
    """Prompt tokens the chosen decode worker does not hold (what a prefill hop would save)."""
    costs: Mapping[str, float] = field(default_factory=dict)
    """Decode cost per decode worker (split) or kv cost (whole request)."""
    prefill_costs: Mapping[str, float] = field(default_factory=dict)


def decode_cost(c: Candidate, prompt_tokens: int, cfg: ScoringConfig, pcfg: PairConfig) -> float:
    """Cost of decoding a `prompt_tokens` request on `c` after a remote prefill: its decode
    load, plus the blocks it must pull (those it holds need no transfer)."""
    missing = max(0, prompt_tokens - c.matched_blocks * cfg.block_size) / cfg.block_size
    return cfg.decode_weight * c.requests + cfg.prefill_weight * (
        pcfg.transfer_weight * missing + c.setup_blocks
    )


def decide_pair(
    prefill: Sequence[Candidate],
    decode: Sequence[Candidate],
    prompt_tokens: int,
    cfg: ScoringConfig,
    pcfg: PairConfig,
    rng: random.Random,
) -> PairDecision:
    """Choose a (prefill, decode) pair for one request, or run it whole on a decode worker.

    The decode worker is chosen first, by `decode_cost` (decode load plus transfer). If its
    uncached suffix is below ``min_prefill_tokens``, no prefill worker is there, or every
    prefill worker has ``saturation_tokens`` queued (and the suffix is at most
    ``local_max_tokens``, when set), the request runs whole on the decode pool, ranked by the
    kv policy (it prefills locally). Otherwise the prefill worker is the kv policy's pick over
    the prefill pool (matched blocks and queued prefill). Pure and deterministic for a given
    `rng` state; raises ValueError when `decode` is empty.
    """
    if not decode:
        raise ValueError("no decode candidates to choose from")
    dcosts = [decode_cost(c, prompt_tokens, cfg, pcfg) for c in decode]
    ties = _tiebreak(rng, len(decode))
    order = sorted(range(len(decode)), key=lambda i: (dcosts[i], ties[i]))
    best = decode[order[0]]
    suffix = max(0, prompt_tokens - best.matched_blocks * cfg.block_size)
    reason = "split"
    if not prefill:
        reason = "no_prefill_worker"
    elif suffix < pcfg.min_prefill_tokens:
        reason = "short_suffix"
    elif (
        pcfg.saturation_tokens > 0
        and (pcfg.local_max_tokens == 0 or suffix <= pcfg.local_max_tokens)
        and all(c.prefill_tokens >= pcfg.saturation_tokens for c in prefill)
    ):
        reason = "prefill_saturated"
    if reason != "split":
        # The decode worker prefills the prompt itself: the kv policy weighs exactly that.
        whole = _kv(decode, prompt_tokens, cfg, rng)
        w = whole.worker
        held = next(c for c in decode if c.worker == w).matched_blocks * cfg.block_size
        return PairDecision(
            False, reason, (), whole.ranking, max(0, prompt_tokens - held), whole.costs
        )
    p = _kv(prefill, prompt_tokens, cfg, rng)
    return PairDecision(
        True,
        "split",
        p.ranking,
        tuple(decode[i].worker for i in order),
        suffix,
        {decode[i].worker: dcosts[i] for i in range(len(decode))},
        p.costs,
    )
