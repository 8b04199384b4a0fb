"""The kv cost in predicted time: per-worker prefill speed, learned from TTFTs."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router_node.scoring import Candidate, ScoringConfig, decide, guard_limit, kv_cost
from router_node.workers import PREFILL_MIN_SAMPLES, Worker, relative_speeds

CFG = ScoringConfig(block_size=16, prefill_weight=1.0, decode_weight=2.0)


def test_a_faster_worker_costs_less_prefill_time() -> None:
    slow, fast = Candidate("slow", speed=1.0), Candidate("fast", speed=2.0)
    assert kv_cost(fast, 3200, CFG) == pytest.approx(kv_cost(slow, 3200, CFG) / 2)
    # Decode load is not prefill: it costs the same on both.
    assert kv_cost(Candidate("f", requests=3, speed=2.0), 16, CFG) == pytest.approx(6 + 0.5)


def test_affinity_yields_when_moving_costs_less_time() -> None:
    # "a" holds half of a 6,400-token prompt and has 1,000 tokens queued: at equal speeds it
    # keeps the request ((3,200 + 500) / 16 = 231 blocks against 400). If "b" is twice as
    # fast, staying costs 231 / (2/3) = 347 block-times and moving 400 / (4/3) = 300: it moves.
    a, b = Candidate("a", matched_blocks=200, prefill_tokens=1000), Candidate("b")
    assert decide("kv", [a, b], 6400, CFG, random.Random(0)).worker == "a"
    a_slow = Candidate("a", matched_blocks=200, prefill_tokens=1000, speed=2 / 3)
    b_fast = Candidate("b", speed=4 / 3)
    assert decide("kv", [a_slow, b_fast], 6400, CFG, random.Random(0)).worker == "b"


def test_a_workers_speed_is_learned_from_its_ttfts() -> None:
    fast, slow = Worker("fast", "http://f"), Worker("slow", "http://s")
    rng = random.Random(1)
    for _ in range(60):
        tokens = rng.randrange(300, 8000)
        # TTFT = tokens / rate, give or take 20% of noise.
        fast.observe_prefill(tokens, tokens / 32_000 * rng.uniform(0.8, 1.2))
        slow.observe_prefill(tokens, tokens / 16_000 * rng.uniform(0.8, 1.2))
    assert fast.prefill_rate == pytest.approx(32_000, rel=0.15)
    assert slow.prefill_rate == pytest.approx(16_000, rel=0.15)
    speeds = relative_speeds([fast, slow])
    assert speeds["fast"] / speeds["slow"] == pytest.approx(2.0, rel=0.25)
    # Short prefills say nothing about throughput and are ignored.
    before = fast.prefill_samples
    fast.observe_prefill(40, 0.05)
    assert fast.prefill_samples == before


def test_speeds_count_only_once_learned() -> None:
    a, b = Worker("a", "http://a"), Worker("b", "http://b")
    for _ in range(PREFILL_MIN_SAMPLES - 1):
        a.observe_prefill(1000, 0.1)
        b.observe_prefill(1000, 0.05)
    assert relative_speeds([a, b]) == {}
    a.observe_prefill(1000, 0.1)
    b.observe_prefill(1000, 0.05)
    assert relative_speeds([a, b]) == pytest.approx({"a": 2 / 3, "b": 4 / 3})


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 200),
            st.integers(0, 50),
            st.integers(0, 5000),
            st.floats(0.1, 10),
        ),
        min_size=1,
        max_size=12,
    ),
    st.integers(1, 9000),
    st.integers(0, 2**32),
)
def test_the_hot_spot_guard_holds_whatever_the_speeds(
    rows: list[tuple[int, int, int, float]], prompt: int, seed: int
) -> None:
    cands = [Candidate(f"w{i}", m, r, p, speed=s) for i, (m, r, p, s) in enumerate(rows)]
    d = decide("kv", cands, prompt, CFG, random.Random(seed))
    chosen = next(c for c in cands if c.worker == d.worker)
    assert chosen.requests <= guard_limit(min(c.requests for c in cands), CFG)
