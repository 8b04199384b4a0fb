"""Mixed-speed fleets, the shared-prefix workload generator and offered-load scaling."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvrouter.bench.sweep import (
    SHARED_PREFIX_CAPACITY_TOKENS,
    Slo,
    peak_goodput,
    real_time_scale,
    report,
    worker_spread,
)
from kvrouter.sim.replay import RequestRecord
from kvrouter.sim.scheduler import step_time_s
from kvrouter.sim.settings import SettingsError, SimSettings
from kvrouter.sim.trace import infinite_cache_hit_ratio, lru_cache_hit_ratio, parse_line
from kvrouter.sim.worker import engine_config
from kvrouter.sim.workload import (
    SharedPrefixSpec,
    at_load,
    offered_load,
    shared_prefix_trace,
    span_s,
    to_jsonl,
)


def test_a_speed_mix_repeats_over_the_workers() -> None:
    s = SimSettings(workers=4, speed_mix="2,1")
    assert [s.speed_of(i) for i in range(4)] == [2.0, 1.0, 2.0, 1.0]
    assert SimSettings().speed_of(3) == 1.0
    fast, slow = engine_config(s, s.speed_of(0)), engine_config(s, s.speed_of(1))
    assert fast.prefill_tokens_per_s == 2 * slow.prefill_tokens_per_s == 32_000
    # A faster GPU is faster at everything: the same step takes half the time.
    assert step_time_s(fast, 8, 4096) == pytest.approx(step_time_s(slow, 8, 4096) / 2)


@pytest.mark.parametrize("mix", ["2,x", "1,0", "-1"])
def test_a_bad_speed_mix_names_its_flag(mix: str) -> None:
    with pytest.raises(SettingsError, match="--speed-mix / KVR_SIM_SPEED_MIX"):
        SimSettings(speed_mix=mix)


def test_the_shared_prefix_workload_is_where_routing_decides() -> None:
    spec = SharedPrefixSpec()
    # The defaults fit the sweep's default fleet: 8 workers of 32,768 tokens.
    assert spec.check(8, SHARED_PREFIX_CAPACITY_TOKENS) == []
    reqs = shared_prefix_trace(spec)
    assert len(reqs) == spec.requests
    assert all(r.input_length == 2048 + 128 and r.output_length == 32 for r in reqs)
    groups = {r.hash_ids[:4] for r in reqs}
    assert len(groups) == spec.groups
    # Every request shares its first 4 blocks with its group and nothing after them.
    tails = [r.hash_ids[4:] for r in reqs]
    assert len(set(tails)) == len(tails)
    # First sightings (no router can serve them from cache) are under 5% of requests.
    assert spec.first_sightings() < 0.05
    ideal = infinite_cache_hit_ratio(reqs).ratio
    assert ideal == pytest.approx((1 - spec.groups / spec.requests) * 2048 / 2176, abs=0.01)
    # One worker's cache cannot hold the prefixes; the fleet's (pooled) nearly reaches ideal.
    one = lru_cache_hit_ratio(reqs, SHARED_PREFIX_CAPACITY_TOKENS // 16).ratio
    fleet = lru_cache_hit_ratio(reqs, 8 * SHARED_PREFIX_CAPACITY_TOKENS // 16).ratio
    assert one < 0.5 * ideal and fleet > 0.98 * ideal
    # Same seed, same trace; written as Mooncake JSONL that parses back to it.
    assert shared_prefix_trace(spec) == reqs
    lines = to_jsonl(reqs[:3]).splitlines()
    assert [parse_line(x) for x in lines] == reqs[:3]


def test_a_spec_outside_the_regime_says_why() -> None:
    small = SharedPrefixSpec(groups=4, requests=40)
    problems = small.check(8, SHARED_PREFIX_CAPACITY_TOKENS)
    assert any("fit in one worker" in p for p in problems)
    assert any("first sighting" in p for p in problems)
    assert any("over half" in p for p in SharedPrefixSpec(groups=200).check(8, 32_768))
    with pytest.raises(ValueError, match="multiple of 512"):
        SharedPrefixSpec(prefix_tokens=1000)


def test_a_trace_is_scaled_to_an_offered_load() -> None:
    reqs = shared_prefix_trace(SharedPrefixSpec(requests=200))
    fleet = 8 * 16_000.0
    for load in (0.3, 1.0, 2.5):
        scaled = at_load(reqs, load, fleet)
        assert offered_load(scaled, fleet) == pytest.approx(load)
        assert [r.hash_ids for r in scaled] == [r.hash_ids for r in reqs]
        assert scaled[0].timestamp_ms == reqs[0].timestamp_ms
    # Twice the load, half the span.
    assert span_s(at_load(reqs, 2.0, fleet)) == pytest.approx(span_s(at_load(reqs, 1.0, fleet)) / 2)
    with pytest.raises(ValueError):
        at_load(reqs, 0, fleet)


def test_goodput_counts_requests_within_both_objectives() -> None:
    slo = Slo(ttft_s=2.0, tpot_s=0.1)
    # Real seconds at time scale 4: TTFT 0.4 -> 1.6 s; TPOT (1.3 - 0.4) / 9 x 4 = 0.4 s.
    fast = RequestRecord(
        0, 0.0, 0.0, "w", 200, 0.4, 0.58, 100, 0, completion_tokens=10, tpot_s=(0.58 - 0.4) / 9
    )
    slow_decode = RequestRecord(
        1, 0.0, 0.0, "w", 200, 0.4, 1.3, 100, 0, completion_tokens=10, tpot_s=(1.3 - 0.4) / 9
    )
    slow_first = RequestRecord(
        2, 0.0, 0.0, "w", 200, 0.6, 0.7, 100, 0, completion_tokens=10, tpot_s=(0.7 - 0.6) / 9
    )
    failed = RequestRecord(3, 0.0, 0.0, "w", 500, error="boom")
    assert slo.met(fast, 4.0)
    assert not slo.met(slow_decode, 4.0)
    assert not slo.met(slow_first, 4.0)
    assert not slo.met(failed, 4.0)


def test_peaks_and_the_report_flag_invalid_points() -> None:
    def point(load: float, policy: str, goodput: float, invalid: list[str]) -> dict[str, Any]:
        return {"load": load, "policy": policy, "goodput_rps": goodput, "invalid": invalid,
                "hit_ratio": 0.5, "ttft_p50_s": 0.1, "ttft_p90_s": 0.2, "ttft_p99_s": 0.3,
                "tpot_p50_s": 0.01, "tpot_p99_s": 0.02, "e2e_p50_s": 1.0, "e2e_p99_s": 2.0,
                "throughput_rps": goodput, "failed": 0, "ttft_mean_s": 0.15,
                "worker_ttft_p50_min_s": 0.05, "worker_ttft_p50_max_s": 0.4,
                "uncached_max_over_mean": 1.25}  # fmt: skip

    points = [
        point(0.5, "kv", 10.0, []),
        point(1.0, "kv", 20.0, ["client sent late: p99 0.300 s > 0.1 s"]),
        point(0.5, "round_robin", 9.0, []),
        point(1.0, "round_robin", 5.0, []),
    ]
    peaks = peak_goodput(points)
    assert peaks["kv"] == {"load": 1.0, "goodput_rps": 20.0, "valid": False,
                           "all_points_valid": False}  # fmt: skip
    assert peaks["round_robin"]["load"] == 0.5 and peaks["round_robin"]["all_points_valid"]
    meta = {"workload": "w", "requests": 4, "workers": 2, "capacity_tokens": 1000,
            "speed_mix": "", "fleet_prefill_tokens_per_s": 32000.0, "native_load": 0.2,
            "ideal_hit_ratio": 0.9, "pooled_hit_ratio": 0.9, "max_lag_s": 0.1,
            "slo": {"ttft_s": 2.0, "tpot_s": 0.1}}  # fmt: skip
    text = report(points, peaks, meta, "kvrouter bench sweep --loads 0.5,1")
    assert "**INVALID**: client sent late" in text
    assert "| kv | 20.00 | 1 | NO |" in text and "| round_robin | 9.00 | 0.5 | yes |" in text
    assert "Command: `kvrouter bench sweep --loads 0.5,1`" in text
    assert "| 0.5 | round_robin | 0.150 | 0.050 | 0.400 | 1.25 |" in text


def test_the_spread_says_whether_the_median_came_from_short_workers() -> None:
    """Two workers at time scale 2: one served three requests fast, the other one slowly and
    computed 1.5x the mean uncached tokens of the two."""

    def rec(i: int, worker: str, ttft: float, prompt: int, cached: int) -> RequestRecord:
        return RequestRecord(i, 0.0, 0.0, worker, 200, ttft, ttft + 1, prompt, cached)

    records = [
        rec(0, "a", 0.1, 100, 50),
        rec(1, "a", 0.2, 100, 50),
        rec(2, "a", 0.3, 100, 50),
        rec(3, "b", 5.0, 500, 50),
        RequestRecord(4, 0.0, 0.0, "b", 500, error="boom"),  # failed: not counted
    ]
    s = worker_spread([records], 2.0)
    assert s["worker_ttft_p50_s"] == {"a": 0.4, "b": 10.0}
    assert (s["worker_ttft_p50_min_s"], s["worker_ttft_p50_max_s"]) == (0.4, 10.0)
    assert s["ttft_mean_s"] == pytest.approx((0.2 + 0.4 + 0.6 + 10.0) / 4)
    # Uncached: a 150, b 450; mean 300.
    assert s["uncached_max_over_mean"] == pytest.approx(1.5)
    assert worker_spread([], 1.0)["ttft_mean_s"] is None
    # Two runs: worker "a" of one run is not "a" of the other; pooled, a slow run's "a"
    # would hide behind the fast one's.
    slow_a = [rec(5, "a", 4.0, 100, 0), rec(6, "a", 4.5, 100, 0), rec(7, "b", 0.1, 100, 0)]
    two = worker_spread([records, slow_a], 2.0)
    assert two["worker_ttft_p50_s"] == {"0/a": 0.4, "0/b": 10.0, "1/a": 8.5, "1/b": 0.2}
    assert (two["worker_ttft_p50_min_s"], two["worker_ttft_p50_max_s"]) == (0.2, 10.0)


@pytest.mark.redis
def test_a_small_sweep_end_to_end(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable, "-m", "kvrouter", "bench", "sweep", "--loads", "0.5,2",
            "--policies", "kv,round_robin", "--workers", "2", "--groups", "4",
            "--requests", "60", "--capacity-tokens", "8192", "--time-scale", "8",
            "--speed-mix", "2,1", "--out", str(tmp_path),
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-8000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["failed"] == 0 and set(final["peaks"]) == {"kv", "round_robin"}
    results = json.loads((tmp_path / "results.json").read_text())
    # A 2,1 mix of 16,000 tokens/s workers: 48,000 tokens/s.
    assert results["fleet_prefill_tokens_per_s"] == 48_000
    assert [(p["load"], p["policy"]) for p in results["points"]] == [
        (0.5, "kv"), (0.5, "round_robin"), (2.0, "kv"), (2.0, "round_robin"),
    ]  # fmt: skip
    for p in results["points"]:
        assert p["requests"] == 60 and p["goodput_rps"] > 0 and isinstance(p["invalid"], list)
        assert p["late_p99_s"] is not None and p["loop_lag_p99_s"] is not None
        assert set(p["worker_ttft_p50_s"]) == {"sim-0", "sim-1"}
        assert 0 < p["worker_ttft_p50_min_s"] <= p["worker_ttft_p50_max_s"]
    assert "--speed-mix 2,1" in (tmp_path / "report.md").read_text()
    # Every run's requests, as the client saw them.
    for load in ("0.5", "2"):
        for policy in ("kv", "round_robin"):
            lines = (tmp_path / "records" / f"load{load}-{policy}-0.jsonl").read_text()
            recs = [json.loads(x) for x in lines.splitlines()]
            assert len(recs) == 60 and all(r["status"] == 200 and r["ttft_s"] for r in recs)
            assert sorted(r["index"] for r in recs) == list(range(60))
    for name in ("ttft_p90_vs_load.png", "goodput_vs_load.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_time_scale_keeps_the_real_rate_within_the_machines_limits() -> None:
    reqs = at_load(shared_prefix_trace(SharedPrefixSpec(requests=200)), 1.0, 128_000.0)
    rps = (len(reqs) - 1) / span_s(reqs)  # about 59 simulated requests per second
    args = argparse.Namespace(time_scale=4.0, max_real_rps=1e9, max_real_tokens_per_s=1e9)
    assert real_time_scale(reqs, args) == 4.0
    args.max_real_rps = 30.0
    assert real_time_scale(reqs, args) == pytest.approx(30.0 / rps)
    args.max_real_tokens_per_s = 2176 * 10.0  # ten of these prompts per real second
    assert real_time_scale(reqs, args) == pytest.approx(10.0 / rps)
