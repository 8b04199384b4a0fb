"""`kvrouter bench listener` on a short stream: runs end to end, checks that the batched path
and the one-call-per-event baseline build the same index, ends with one JSON line. No timing
is asserted (the machine is shared and noisy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.redis


def test_bench_listener_small(redis_url: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url}
    args = ["bench", "listener", "--quick", "--steps", "200", "--workers", "2"]
    res = subprocess.run(
        [sys.executable, "-m", "kvrouter", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["bench"] == "listener"
    assert last["block_events"] > last["baseline_block_events"] > 0
    for key in ("block_events_per_s", "baseline_block_events_per_s", "speedup"):
        assert last[key] > 0
    # The longest script call (SLOWLOG) is reported; at least one flush's call took >= 100 us.
    assert last["script_calls"] > 0 and last["slowlog_complete"]
    assert last["script_longest_us"] >= 100
