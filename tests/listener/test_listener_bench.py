"""`kvrouter bench listener` on a short stream: runs end to end, checks that the batched path
and the one-call-per-event baseline build the same index, ends with one JSON line. No timing
is asserted (the machine is shared and noisy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from kvrouter.bench.listener_bench import _index_state, build_streams, run_listener_path

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


async def test_bounded_calls_build_the_same_index(redis_client: Any) -> None:
    """The shipped path with calls cut to 64 ops (many sub-batches per flush, clears among
    them) ends with exactly the index one call per worker per flush builds, in more calls."""
    streams = build_streams(2, 120, 128, seed=5)
    states = []
    calls = []
    for max_ops in (1_000_000, 64):
        await redis_client.flushall()
        await redis_client.config_resetstat()
        await run_listener_path(redis_client, streams, 4096, max_ops)
        calls.append(int((await redis_client.info("commandstats"))["cmdstat_evalsha"]["calls"]))
        states.append(await _index_state(redis_client, 2))
    assert states[0] == states[1]
    assert calls[1] > calls[0]
