"""The scorer is a pure function: these tests need no Redis, no server and no clock."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router_node.scoring import Candidate, ScoringConfig, decide, guard_limit, kv_cost

CFG = ScoringConfig(block_size=16, prefill_weight=1.0, decode_weight=2.0, balance_abs=4)


def rng(seed: int = 0) -> random.Random:
    return random.Random(seed)


def test_kv_cost_formula() -> None:
    c = Candidate("a", matched_blocks=10, requests=3, prefill_tokens=320)
    # (1000 - 160) / 16 own blocks + 0.5 x 320 / 16 queued (queue_weight), + 2 x 3 requests
    assert kv_cost(c, 1000, CFG) == pytest.approx(52.5 + 0.5 * 20 + 6)
    full = dataclasses.replace(CFG, queue_weight=1.0)
    assert kv_cost(c, 1000, full) == pytest.approx(52.5 + 20 + 6)


def test_kv_prefers_the_cached_prefix_at_equal_load() -> None:
    cands = [Candidate("a", 0), Candidate("b", 50), Candidate("c", 10)]
    d = decide("kv", cands, 1000, CFG, rng())
    assert d.worker == "b" and d.reason == "prefix"
    assert d.ranking == ("b", "c", "a")
    assert d.costs["b"] < d.costs["c"] < d.costs["a"]


def test_kv_load_outweighs_a_small_match() -> None:
    cands = [Candidate("a", 2, requests=4), Candidate("b", 0, requests=0)]
    d = decide("kv", cands, 1000, CFG, rng())
    assert d.worker == "b" and d.reason == "load"


def test_kv_ties_are_broken_at_random() -> None:
    cands = [Candidate("a"), Candidate("b"), Candidate("c")]
    winners = {decide("kv", cands, 100, CFG, rng(seed)).worker for seed in range(40)}
    assert winners == {"a", "b", "c"}
    assert {decide("kv", cands, 100, CFG, rng(seed)).reason for seed in range(5)} == {"no_match"}


def test_kv_is_deterministic_for_a_given_rng_state() -> None:
    cands = [Candidate(str(i), i % 3, i % 2) for i in range(8)]
    assert decide("kv", cands, 500, CFG, rng(7)) == decide("kv", cands, 500, CFG, rng(7))


def test_temperature_samples_by_cost() -> None:
    cfg = ScoringConfig(temperature=5.0)
    cands = [Candidate("a", 10), Candidate("b", 8), Candidate("c", 0)]
    picks = Counter(decide("kv", cands, 400, cfg, rng(s)).worker for s in range(400))
    assert picks["a"] > picks["b"] > picks["c"] > 0
    cold = Counter(decide("kv", cands, 400, CFG, rng(s)).worker for s in range(50))
    assert cold == {"a": 50}


def test_guard_holds_back_an_overloaded_cache_holder() -> None:
    cands = [Candidate("hot", 100, requests=9), Candidate("cold", 0, requests=4)]
    d = decide("kv", cands, 2000, CFG, rng())
    # hot leads by 5 > balance_abs 4: it is ranked last although its cost is lower.
    assert d.costs["hot"] < d.costs["cold"]
    assert d.worker == "cold" and d.reason == "guard" and d.guarded == ("hot",)
    assert d.ranking == ("cold", "hot")  # still a retry target


def test_guard_limit_relative_part() -> None:
    cfg = ScoringConfig(balance_abs=4, balance_rel=1.5)
    assert guard_limit(0, cfg) == 4
    assert guard_limit(20, cfg) == 30


def _simulate(policy: str, n_workers: int, n_requests: int, seed: int) -> list[int]:
    """Requests that all share a 100-block system prompt, held at first only by worker 0;
    each routed request stays in flight and leaves the prefix on its worker."""
    loads = [0] * n_workers
    matched = [100] + [0] * (n_workers - 1)
    r = random.Random(seed)
    for _ in range(n_requests):
        cands = [Candidate(f"w{i}", matched[i], loads[i]) for i in range(n_workers)]
        d = decide(policy, cands, 100 * 16 + 40, CFG, r)
        i = int(d.worker[1:])
        loads[i] += 1
        matched[i] = 100
    return loads


def test_shared_system_prompt_cannot_pull_the_fleet_onto_one_worker() -> None:
    loads = _simulate("kv", 8, 200, seed=1)
    assert max(loads) - min(loads) <= CFG.balance_abs + 1
    # The baseline without the load term does melt one worker.
    assert _simulate("prefix_only", 8, 200, seed=1) == [200] + [0] * 7


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 200), st.integers(0, 50), st.integers(0, 5000)),
        min_size=1,
        max_size=12,
    ),
    st.integers(1, 9000),
    st.integers(0, 2**32),
    st.floats(0, 10),
)
def test_kv_never_picks_a_worker_over_the_guard_line(
    rows: list[tuple[int, int, int]], prompt: int, seed: int, temperature: float
) -> None:
    cfg = ScoringConfig(temperature=temperature)
    cands = [Candidate(f"w{i}", m, r, p) for i, (m, r, p) in enumerate(rows)]
    d = decide("kv", cands, prompt, cfg, random.Random(seed))
    chosen = next(c for c in cands if c.worker == d.worker)
    assert chosen.requests <= guard_limit(min(c.requests for c in cands), cfg)
    assert sorted(d.ranking) == sorted(c.worker for c in cands)


def test_least_load() -> None:
    cands = [Candidate("a", 9, 3), Candidate("b", 0, 1, 500), Candidate("c", 0, 1, 100)]
    d = decide("least_load", cands, 100, CFG, rng())
    assert d.ranking == ("c", "b", "a") and d.reason == "least_load"


def test_prefix_only_ignores_load() -> None:
    cands = [Candidate("a", 9, 300), Candidate("b", 1, 0)]
    assert decide("prefix_only", cands, 100, CFG, rng()).worker == "a"
    d = decide("prefix_only", [Candidate("a"), Candidate("b", 0, 1)], 100, CFG, rng())
    assert d.worker == "a" and d.reason == "no_match"


def test_round_robin_rotates() -> None:
    cands = [Candidate("b"), Candidate("a"), Candidate("c")]
    firsts = [decide("round_robin", cands, 1, CFG, rng(), sequence=i).worker for i in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


def test_random_uses_every_worker() -> None:
    cands = [Candidate("a"), Candidate("b"), Candidate("c")]
    r = rng()
    assert {decide("random", cands, 1, CFG, r).worker for _ in range(60)} == {"a", "b", "c"}


def test_session_affinity_is_stable_and_moves_little() -> None:
    cands = [Candidate(f"w{i}") for i in range(6)]
    keys = [f"user-{i}" for i in range(300)]
    before = {k: decide("session", cands, 1, CFG, rng(), session_key=k).worker for k in keys}
    again = {k: decide("session", cands, 1, CFG, rng(9), session_key=k).worker for k in keys}
    assert before == again
    assert len(set(before.values())) == 6
    fewer = [c for c in cands if c.worker != "w0"]
    after = {k: decide("session", fewer, 1, CFG, rng(), session_key=k).worker for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "w0" for k in moved)  # only w0's sessions moved (rendezvous)
    d = decide("session", [Candidate("a", 0, 5), Candidate("b")], 1, CFG, rng())
    assert d.worker == "b" and d.reason == "no_session"


def test_bad_calls() -> None:
    with pytest.raises(ValueError, match="no candidates"):
        decide("kv", [], 1, CFG, rng())
    with pytest.raises(ValueError, match="unknown policy"):
        decide("fastest", [Candidate("a")], 1, CFG, rng())
