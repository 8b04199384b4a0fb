"""`kvrouter demo` as a user runs it: a process, on its embedded Redis or on a given one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.redis

SHORT = ["--requests", "30", "--time-scale", "40", "--workers", "2"]


def _demo(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvrouter", "demo", *SHORT, *extra],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=280,
    )


def _check_table(out: str) -> None:
    for policy in ("kv", "round_robin", "least_load"):
        # one progress line and one table row per policy, each with a hit ratio
        assert re.search(rf"^\s*{policy}\s+hit ratio \d\.\d{{3}}, TTFT p50", out, re.M), out
        assert re.search(rf"^\|?\s*{policy}\s*\|", out, re.M), out
    assert "kv: " in out and "round_robin's hit ratio" in out, out


def test_demo_on_its_embedded_redis() -> None:
    proc = _demo()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    assert "30 requests of the bundled Mooncake trace" in proc.stdout
    _check_table(proc.stdout)


def test_demo_uses_the_given_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    proc = _demo("--redis-url", redis_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    _check_table(proc.stdout)
    # the index was written to the given server, not to an embedded one
    assert any(k.startswith(b"kvr:") for k in client.scan_iter(count=1000))
    client.close()
