"""`kvrouter bench router` end to end on small sizes: it starts its own router and worker
processes, checks the tokenizer's exactness, and ends with one JSON line. Timings are never
asserted (this machine is shared and noisy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.redis


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_bench_router_small(redis_url: str, stream: bool) -> None:
    env = {**os.environ, "REDIS_URL": redis_url}
    cmd = [sys.executable, "-m", "kvrouter", "bench", "router", "--quick"]
    cmd += ["--requests", "30", "--duration", "0.3", "--prompt-tokens", "512"]
    cmd += ["--chat-tokens", "2000", *(["--stream"] if stream else [])]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["bench"] == "router" and last["samples"] == 30
    assert last["tokenize_exact"] is True
    for key in ("direct_p50_ms", "router_p50_ms", "router_rps", "tokenize_speedup"):
        assert last[key] > 0
    assert "added by the router" in res.stdout
    # The EPP path (Envoy from the test extra, `kvrouter epp`) runs in the same run.
    assert last["epp_rps"] > 0 and last["envoy_p50_ms"] > 0 and last["epp_p50_ms"] > 0
    assert "added by Envoy's EPP call" in res.stdout
    # ... in both Envoy configurations: the protocol's and the lean one (request only).
    assert last["epp_lean_rps"] > 0 and last["epp_lean_p50_ms"] > 0
    assert last["stream"] is stream
    assert isinstance(last["targets_met"]["epp_below_proxy"], bool)
