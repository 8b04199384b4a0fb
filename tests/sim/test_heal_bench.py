"""`kvrouter bench heal`'s count of requests misrouted to a worker (pure; the whole bench
runs as `kvrouter bench heal --quick`, figures in docs/benchmarks.md)."""

from __future__ import annotations

from prometheus_client import generate_latest

from kvrouter.bench import heal_bench
from kvrouter.bench.heal_bench import misroutes
from kvrouter.sim.replay import RequestRecord
from router_node.metrics import Metrics


def rec(i: int, worker: str, matched: int, cached: int, status: int = 200) -> RequestRecord:
    r = RequestRecord(index=i, arrival_s=0.0, max_tokens=1, sent_s=float(i), e2e_s=2.5)
    r.status, r.worker, r.matched_tokens, r.cached_tokens = status, worker, matched, cached
    return r


def test_misroutes_compare_whole_blocks_on_one_worker() -> None:
    records = [
        rec(0, "w", 160, 0),  # over by 10 blocks: misrouted
        rec(1, "x", 160, 0),  # another worker
        rec(2, "w", 160, 170),  # the same 10 whole blocks: not misrouted
        rec(3, "w", 160, 160),
        rec(4, "w", 96, 80),  # one block short: misrouted
        rec(5, "w", 160, 0, status=503),  # failed: not counted
        rec(6, "w", 0, 64),  # under-predicted: not misrouted
    ]
    out = misroutes(records, "w", 16)
    assert out["misrouted"] == 2
    assert out["requests_to_worker"] == 5
    assert out["over_predicted_tokens"] == 160 + 16
    assert out["misroute_positions"] == [1, 4]
    assert out["last_misroute_at"] == 4
    # The first misroute (sent at 0 s) answered at 2.5 s: requests 0-2 were on their way.
    assert out["sent_before_first_answer"] == 2
    assert out["misrouted_after_first_answer"] == 1
    assert misroutes(records, "nobody", 16)["last_misroute_at"] == 0


def test_a_shortfall_within_a_prefix_still_being_computed_is_a_race() -> None:
    prompts = {0: (1, 2, 3), 1: (1, 2, 9), 2: (1, 2, 3, 4), 3: (5, 6)}
    records = [
        rec(0, "w", 0, 0),  # cold, nothing matched: e2e 2.5 s, in flight until 2.5 s
        rec(1, "w", 1024, 0),  # matched the 2 blocks it shares with request 0 in flight: race
        rec(2, "w", 1536, 0),  # matched 3 blocks, request 0 still in flight: a race too
        rec(3, "w", 512, 0),  # shares nothing with anything in flight: misrouted
    ]
    out = misroutes(records, "w", 16, prompts, trace_block_tokens=512)
    assert out["races"] == 2 and out["race_positions"] == [2, 3]
    assert out["misrouted"] == 1 and out["misroute_positions"] == [4]
    assert out["over_predicted_tokens"] == 512
    # Request 0 has answered by 3.0 s: the same shortfall is then no race.
    late = [rec(0, "w", 0, 0), rec(3, "w", 1024, 0)]
    late[1].index = 1
    assert misroutes(late, "w", 16, prompts, trace_block_tokens=512)["misrouted"] == 1
    # Without the prompts nothing is taken for a race.
    assert misroutes(records, "w", 16)["misrouted"] == 3


def test_counter_sums_a_counter_over_its_labels() -> None:
    """The bench reads the router's counters from its /metrics page: every label set summed,
    the ``_created`` samples left out, 0 for a counter not on the page."""
    metrics = Metrics()
    metrics.index_abort_clears.labels("m", "w1").inc()
    metrics.index_abort_clears.labels("m", "w2").inc(2)
    text = generate_latest(metrics.registry).decode()
    assert heal_bench._counter(text, "kvrouter_index_abort_clears_total") == 3.0
    assert heal_bench._counter(text, "kvrouter_index_refused_clears_total") == 0.0
