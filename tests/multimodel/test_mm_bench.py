"""`kvrouter bench routing --models 2`: two disjoint traces (split by conversation) as two
models on one simulated fleet, with a hit ratio per model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvrouter.bench.routing_bench import model_names, per_model_table, split_by_conversation
from kvrouter.sim.replay import session_id
from kvrouter.sim.trace import bundled_trace, load_trace

ROOT = Path(__file__).resolve().parents[2]


def test_the_trace_splits_into_disjoint_conversation_preserving_shares() -> None:
    requests = load_trace(bundled_trace(), limit=600)
    names = model_names("m", 2)
    assert names == ("m", "m-lora-1")
    shares = split_by_conversation(requests, names)
    assert sum(len(s) for s in shares.values()) == len(requests)
    assert all(len(s) > len(requests) // 4 for s in shares.values())
    convs = [{session_id(r) for r in s} for s in shares.values()]
    assert not convs[0] & convs[1]
    for s in shares.values():  # trace order kept
        assert [r.timestamp_ms for r in s] == sorted(r.timestamp_ms for r in s)
    table = per_model_table(
        {"kv": {"per_model": {"m": {"hit_ratio": 0.5}, "m-lora-1": {"hit_ratio": 0.25}}}},
        {"m": 0.6, "m-lora-1": 0.3},
    )
    assert "| kv | 0.500 | 0.250 |" in table and "0.600 | 0.300" in table


@pytest.mark.redis
def test_bench_routing_models_2_reports_per_model_hit_ratios(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvrouter",
            "bench",
            "routing",
            "--models",
            "2",
            "--variants",
            "kv",
            "--limit",
            "60",
            "--time-scale",
            "40",
            "--workers",
            "2",
            "--no-plots",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-8000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["models"] == 2
    per_model = final["policies"]["kv"]["per_model"]
    assert set(per_model) == {"llama-3-8b", "llama-3-8b-lora-1"}
    assert all(m["failed"] == 0 for m in per_model.values())
    # Multi-turn conversations hit their own model's cache on both models.
    assert all(m["hit_ratio"] > 0 for m in per_model.values())
    assert "llama-3-8b-lora-1 hit ratio" in (tmp_path / "report.md").read_text()
