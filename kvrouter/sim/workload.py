"""Synthetic workloads in Mooncake format, and replaying any trace at a chosen offered load.

Shared-prefix workload
----------------------
Many groups, each a long system prompt shared by all its requests, followed by a short
question unique to the request (the shape of llm-d's "shared prefix" benchmark). A
cache-aware router decides the outcome when the prefixes together exceed one worker's KV
cache but fit in the fleet's: it can keep each group on a few workers, while round-robin
spreads every group over every worker and each cache thrashes. `SharedPrefixSpec.check()`
says whether a spec is in that regime for a given fleet, and how many requests are a
prefix's first sighting (which no router can serve from cache).

Offered load
------------
Load is offered prompt tokens per second over the fleet's prefill capacity (tokens per
second every worker can prefill, summed). `offered_load()` measures a trace's, and
`at_load()` rescales its arrival times to reach a target.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvrouter.sim.trace import TRACE_BLOCK_TOKENS, TraceRequest

# Question blocks get ids far above any group's, so no question block equals a prefix block.
_QUESTION_ID_BASE = 1 << 40


@dataclass(frozen=True, slots=True)
class SharedPrefixSpec:
    """The shape of a shared-prefix workload; every size in tokens."""

    groups: int = 64
    prefix_tokens: int = 2048
    question_tokens: int = 128
    output_tokens: int = 32
    requests: int = 1400
    rate_rps: float = 10.0
    """Mean arrival rate (Poisson); the sweep rescales it to each load anyway."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("groups", "requests", "question_tokens", "output_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.prefix_tokens < TRACE_BLOCK_TOKENS or self.prefix_tokens % TRACE_BLOCK_TOKENS:
            # A prefix that ends mid-block would share that block's id with its questions'
            # text in Mooncake's format, which cannot say "half a block is shared".
            raise ValueError(f"prefix_tokens must be a multiple of {TRACE_BLOCK_TOKENS}")
        if not self.rate_rps > 0:
            raise ValueError("rate_rps must be > 0")

    @property
    def working_set_tokens(self) -> int:
        """Every group's prefix together."""
        return self.groups * self.prefix_tokens

    def first_sightings(self) -> float:
        """Share of requests that are the first of their group (about groups / requests)."""
        return min(self.groups, self.requests) / self.requests

    def check(self, workers: int, capacity_tokens: int) -> list[str]:
        """Why this spec is not a workload where routing decides the outcome on `workers`
        workers of `capacity_tokens` each (empty when it is)."""
        problems = []
        if self.working_set_tokens <= capacity_tokens:
            problems.append(
                f"the prefixes ({self.working_set_tokens:,} tokens) fit in one worker's cache "
                f"({capacity_tokens:,}): every policy hits"
            )
        if self.working_set_tokens > workers * capacity_tokens // 2:
            problems.append(
                f"the prefixes ({self.working_set_tokens:,} tokens) take over half the "
                f"fleet's cache ({workers * capacity_tokens:,}): even a partition thrashes"
            )
        if self.first_sightings() >= 0.05:
            problems.append(
                f"{self.first_sightings():.1%} of requests are a prefix's first sighting "
                "(at least 5%): raise --requests or lower --groups"
            )
        return problems


def shared_prefix_trace(spec: SharedPrefixSpec) -> list[TraceRequest]:
    """The workload's requests, groups drawn uniformly at random, Poisson arrivals."""
    rng = random.Random(spec.seed)
    prefix_blocks = spec.prefix_tokens // TRACE_BLOCK_TOKENS
    q_blocks = -(-spec.question_tokens // TRACE_BLOCK_TOKENS)
    out: list[TraceRequest] = []
    t_ms = 0.0
    next_q = _QUESTION_ID_BASE
    for _ in range(spec.requests):
        g = rng.randrange(spec.groups)
        ids = [g * prefix_blocks + j for j in range(prefix_blocks)]
        ids.extend(range(next_q, next_q + q_blocks))
        next_q += q_blocks
        out.append(
            TraceRequest(
                timestamp_ms=round(t_ms, 3),
                input_length=spec.prefix_tokens + spec.question_tokens,
                output_length=spec.output_tokens,
                hash_ids=tuple(ids),
            )
        )
        t_ms += rng.expovariate(spec.rate_rps) * 1000.0
    return out


def to_jsonl(requests: Sequence[TraceRequest]) -> str:
    """Mooncake JSONL of `requests` (what `kvrouter replay` and the benchmarks read)."""
    import json

    return "".join(
        json.dumps(
            {
                "timestamp": r.timestamp_ms,
                "input_length": r.input_length,
                "output_length": r.output_length,
                "hash_ids": list(r.hash_ids),
            }
        )
        + "\n"
        for r in requests
    )


def span_s(requests: Sequence[TraceRequest]) -> float:
    """Seconds from the first arrival to the last."""
    if len(requests) < 2:
        return 0.0
    return (requests[-1].timestamp_ms - requests[0].timestamp_ms) / 1000.0


def offered_load(requests: Sequence[TraceRequest], fleet_prefill_tokens_per_s: float) -> float:
    """Offered prompt tokens per second over the fleet's prefill capacity. The span is
    stretched by one mean gap so that n requests over n - 1 gaps count as n arrivals."""
    span = span_s(requests)
    if span <= 0 or fleet_prefill_tokens_per_s <= 0:
        raise ValueError("need at least two requests at different times and a capacity > 0")
    span *= len(requests) / (len(requests) - 1)
    return sum(r.input_length for r in requests) / span / fleet_prefill_tokens_per_s


def at_load(
    requests: Sequence[TraceRequest], load: float, fleet_prefill_tokens_per_s: float
) -> list[TraceRequest]:
    """`requests` with arrival times scaled (about the first) to offer `load`."""
    if not load > 0:
        raise ValueError("load must be > 0")
    factor = offered_load(requests, fleet_prefill_tokens_per_s) / load
    t0 = requests[0].timestamp_ms
    return [replace(r, timestamp_ms=t0 + (r.timestamp_ms - t0) * factor) for r in requests]
