"""`kvrouter bench index` on a small index: it runs end to end, checks its own lookups against
the expected depths (both the shipped script and the naive baseline), and ends with one JSON
line. No timing is asserted: this machine is shared and noisy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.redis


def test_bench_index_small(redis_url: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvrouter",
            "bench",
            "index",
            "--quick",
            "--records",
            "20000",
            "--workers",
            "17",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["bench"] == "index"
    assert last["records"] >= 20000
    for key in (
        "lookup_2048_p50_ms",
        "naive_lookup_2048_p50_ms",
        "record_2048_p50_ms",
        "bytes_per_record",
    ):
        assert last[key] > 0


def test_bench_rejects_bad_arguments() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "kvrouter", "bench", "index", "--workers", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode != 0 and "--workers" in res.stderr
