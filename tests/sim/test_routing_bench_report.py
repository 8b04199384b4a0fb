"""The routing bench's report: decisions by reason from /metrics, repeated runs combined, and
the 4-replica comparison; plus one small repeated run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kvrouter.bench.routing_bench import (
    VARIANTS,
    combine_runs,
    decision_reasons,
    finish_summary,
    loop_lag,
    pd_decision_reasons,
    pd_table,
    replica_comparison,
    validity,
)
from kvrouter.sim.replay import RequestRecord, prediction
from router_node.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]

METRICS = """\
# HELP kvrouter_routing_decisions_total routing decisions by policy and reason
# TYPE kvrouter_routing_decisions_total counter
kvrouter_routing_decisions_total{policy="kv",reason="prefix"} 70.0
kvrouter_routing_decisions_total{policy="kv",reason="load"} 20.0
kvrouter_routing_decisions_total{policy="kv",reason="no_match"} 10.0
kvrouter_requests_total{endpoint="/v1/completions",status="200"} 100.0
"""


def test_decision_reasons_from_metrics() -> None:
    assert decision_reasons(METRICS) == Counter(prefix=70, load=20, no_match=10)
    assert decision_reasons("") == Counter()


PD_METRICS = """\
kvrouter_pd_decisions_total{reason="split"} 54.0
kvrouter_pd_decisions_total{reason="prefill_saturated"} 45.0
kvrouter_pd_decisions_total{reason="short_suffix"} 1.0
"""


def test_pd_decisions_and_table() -> None:
    reasons = pd_decision_reasons(PD_METRICS)
    assert reasons == Counter(split=54, prefill_saturated=45, short_suffix=1)
    assert pd_decision_reasons(METRICS) == Counter()
    agg = {"ttft_p50_s": 1.4, "ttft_p99_s": 7.7, "tpot_p50_s": 0.015, "tpot_p99_s": 0.145,
           "compute_hit_ratio": 0.117, "transfer_gb": 0.0}  # fmt: skip
    pd = {**agg, "tpot_p99_s": 0.075, "transfer_gb": 521.9, "pd_decisions": dict(reasons)}
    table = pd_table({"kv": agg, "kv_pd": pd})
    assert "| kv | 1.400 | 7.700 | 0.0150 | 0.1450 | 0.117 | 0.00 | aggregated |" in table
    assert "| kv_pd |" in table and "split 54%, prefill_saturated 45%" in table
    assert pd_table({"kv": agg}) == ""  # no split variant, no table


def test_pd_variants_keep_the_gpu_count() -> None:
    by_name = {v.name: v for v in VARIANTS}
    assert by_name["kv_pd"].prefill_workers(8) == 2  # 2 prefill + 6 decode
    assert by_name["kv_pd_half"].prefill_workers(8) == 4
    assert by_name["kv_pd_3p"].prefill_workers(8) == 3  # 3 prefill + 5 decode
    assert by_name["kv_pd_3p_local"].prefill_workers(8) == 3
    assert by_name["kv_pd_half_local"].prefill_workers(8) == 4
    # The stall-bounded guard is the saturation guard plus the local suffix bound.
    env = dict(by_name["kv_pd_local"].router_env)
    assert env == {"KVR_PD_SATURATION_TOKENS": "16384", "KVR_PD_LOCAL_MAX_TOKENS": "2048"}
    assert by_name["kv_pd"].prefill_workers(2) == 1  # a decode worker always remains
    assert by_name["kv"].prefill_workers(8) == 0


def test_tpot_is_the_time_per_token_after_the_first() -> None:
    from kvrouter.sim.replay import summarize

    recs = [RequestRecord(i, 0.0, 0.0, "sim-0", 200, 0.5, 2.5, 10, 0, 5) for i in range(3)]
    for r in recs:
        r.tpot_s = 0.5  # (2.5 - 0.5) / (5 - 1), as _one computes it
    s = summarize(recs)
    assert s["tpot_p50_s"] == s["tpot_p99_s"] == 0.5


def test_decision_reasons_from_a_router_registry() -> None:
    """What a router exports today (a `model` label, `_created` samples) reads the same,
    summed over models."""
    m = Metrics()
    for model, reason, n in (("a", "prefix", 3), ("b", "prefix", 2), ("a", "load", 1)):
        m.decisions.labels("kv", reason, model).inc(n)
    m.requests.labels("completions", "200", "a").inc(6)
    assert decision_reasons(m.render()) == Counter(prefix=5, load=1)


def _run(hits: list[int], worker: str = "sim-0") -> list[RequestRecord]:
    return [
        RequestRecord(i, 0.0, 0.0, worker, 200, 0.1 * (i + 1), 1.0, 100, h)
        for i, h in enumerate(hits)
    ]


def test_runs_combine_to_the_mean_hit_ratio_with_their_spread() -> None:
    a, b = _run([10, 30]), _run([20, 40], worker="sim-1")
    runs = [
        (finish_summary(a, 10.0, Counter(prefix=2), 2, 4.0), a),
        (finish_summary(b, 10.0, Counter(prefix=1, load=1), 2, 4.0), b),
    ]
    assert [s["hit_ratio"] for s, _ in runs] == [0.2, 0.3]
    combined = combine_runs(runs, 2, 4.0)
    assert combined["hit_ratio"] == pytest.approx(0.25)
    assert combined["hit_ratio_runs"] == [0.2, 0.3]
    assert combined["hit_ratio_sd"] == pytest.approx(0.0707, abs=1e-4)
    assert combined["decisions"] == {"load": 1, "prefix": 3}
    assert combined["requests"] == 4 and combined["per_worker"] == {"sim-0": 2, "sim-1": 2}
    assert combine_runs(runs[:1], 2, 4.0) is runs[0][0]


def test_replica_comparison() -> None:
    one = {"hit_ratio": 0.125, "hit_ratio_runs": [0.12, 0.13], "hit_ratio_sd": 0.007}
    four = {"hit_ratio": 0.1225, "hit_ratio_runs": [0.121, 0.124], "hit_ratio_sd": 0.002}
    line = replica_comparison({"kv": one, "kv_4x": four})
    assert "0.1225 against 0.1250 with one (-2.0%)" in line
    assert "over 2 runs each" in line and "0.120 0.130 / 0.121 0.124" in line
    assert replica_comparison({"kv": one}) == ""


@pytest.mark.redis
def test_bench_routing_repeat_runs_each_variant_and_compares_replicas(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "kvrouter", "bench", "routing", "--variants", "kv,kv_4x",
            "--repeat", "2", "--limit", "40", "--time-scale", "40", "--workers", "2",
            "--out", str(tmp_path),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-8000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["repeat"] == 2
    for name in ("kv", "kv_4x"):
        p = final["policies"][name]
        assert p["failed"] == 0 and len(p["hit_ratio_runs"]) == 2
    assert "kv_4x_vs_kv" in final
    assert proc.stderr.count("(run 2/2):") == 2
    report = (tmp_path / "report.md").read_text()
    assert "kv with 4 router replicas" in report and "prefix decisions" in report
    # the report's plots, rendered by matplotlib from the lock (the bench extra)
    for name in ("ttft_cdf.png", "hit_ratio.png", "load.png"):
        png = (tmp_path / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000, name
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["variants"]["kv_4x"]["requests"] == 80
    assert sum(results["variants"]["kv_4x"]["decisions"].values()) == 80
    # The router's prediction, measured against the engine's report for every request.
    assert results["variants"]["kv"]["predicted"] == 80
    assert 0.0 <= final["policies"]["kv"]["exact_share"] <= 1.0
    assert "| exact | over | under |" in report


def test_prediction_compares_matched_with_cached_tokens() -> None:
    def rec(matched: int | None, cached: int | None, status: int = 200) -> RequestRecord:
        return RequestRecord(
            0, 0.0, status=status, prompt_tokens=100, matched_tokens=matched, cached_tokens=cached
        )

    got = prediction([rec(32, 32), rec(48, 32), rec(0, 16), rec(None, 16), rec(64, 0, 503)])
    assert got["predicted"] == 3
    assert got["exact_share"] == 1 / 3
    assert (got["over_tokens"], got["under_tokens"]) == (16, 16)
    assert got["over_share"] == got["under_share"] == 16 / 300
    assert prediction([])["exact_share"] is None


LAG_METRICS = """\
kvrouter_event_loop_lag_seconds_bucket{le="0.001"} 90
kvrouter_event_loop_lag_seconds_bucket{le="0.0025"} 98
kvrouter_event_loop_lag_seconds_bucket{le="0.005"} 99
kvrouter_event_loop_lag_seconds_bucket{le="0.01"} 100
kvrouter_event_loop_lag_seconds_bucket{le="+Inf"} 100
kvrouter_event_loop_lag_seconds_count 100
kvrouter_event_loop_lag_max_seconds 0.008
"""


def test_loop_lag_p99_and_max_from_metrics() -> None:
    assert loop_lag(LAG_METRICS) == (0.005, 0.008)
    assert loop_lag("") == (None, None)


def test_a_late_client_or_a_lagging_router_makes_a_run_invalid() -> None:
    ok = {"late_p99_s": 0.02, "loop_lag_p99_s": 0.04}
    assert validity(ok, 0.1) == []
    late = validity({**ok, "late_p99_s": 0.3}, 0.1)
    assert len(late) == 1 and "client sent late" in late[0]
    lag = validity({**ok, "loop_lag_p99_s": 0.5}, 0.1)
    assert len(lag) == 1 and "event loop" in lag[0]
    # Lateness counts in the summary, in simulated seconds (real x time scale).
    recs = [
        RequestRecord(
            i, 0.0, 0.01 * i, "sim-0", 200, 0.1, 1.0, 100, 0, completion_tokens=5,
            tpot_s=(1.0 - 0.1) / 4,
        )
        for i in range(3)
    ]  # fmt: skip
    s = finish_summary(recs, 1.0, Counter(), 1, 4.0)
    assert s["late_max_s"] == pytest.approx(0.08)
    assert s["tpot_p50_s"] == pytest.approx((1.0 - 0.1) / 4 * 4.0)
