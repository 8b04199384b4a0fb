"""`kvrouter demo` as a user runs it: a process, on its embedded Redis or on a given one."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.redis

SHORT = ["--workload", "bundled", "--requests", "30", "--time-scale", "40", "--workers", "2"]


def _demo(*extra: str, short: Sequence[str] = SHORT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvrouter", "demo", *short, *extra],
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


def test_demo_on_the_shared_prefix_workload_says_what_routing_did(tmp_path: Path) -> None:
    # 4 workers hold the 48 prefixes between them, not one each: kv partitions, round-robin
    # thrashes. Short (300 requests), so the verdict's latency ratios are not asserted.
    proc = _demo("--out", str(tmp_path), short=["--requests", "300", "--workers", "4"])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    assert "300 requests in 48 groups sharing 2,048-token system prompts" in proc.stdout
    hits = dict(re.findall(r"^\s*(\w+)\s+hit ratio (\d\.\d{3})", proc.stdout, re.M))
    assert float(hits["kv"]) > 1.5 * float(hits["round_robin"]), proc.stdout
    for other in ("round_robin", "least_load"):
        assert re.search(
            rf"^kv against {other}: hit ratio .* TTFT p50 .* TTFT p90 ", proc.stdout, re.M
        )
    assert "0 failed requests" in proc.stdout and str(tmp_path / "ttft_cdf.png") in proc.stdout
    # Whether the machine kept up is said either way (a shared CI runner may not).
    assert "Every run valid" in proc.stdout or "measured the machine" in proc.stdout
    assert (tmp_path / "ttft_cdf.png").read_bytes().startswith(b"\x89PNG")


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name: state, parent pid, ..."""
    return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, with their command lines."""
    out: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat(entry.name)[1]) == pid:
                out[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                )
        except (OSError, IndexError, ValueError):
            continue
    return out


def _running(pid: int) -> bool:
    try:
        state = _stat(pid)[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_terminated_demo_stops_its_fleet() -> None:
    """`timeout`, a cancelled CI job or `kill` sends SIGTERM: the demo's Redis, workers,
    listener and router (in process sessions of their own, out of reach of a signal to the
    demo alone) must stop with it, as they do on Ctrl-C."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "kvrouter", "demo", "--workload", "bundled", "--requests", "300"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(" serve " in c for c in seen.values()):
            assert demo.poll() is None, demo.stderr.read().decode() if demo.stderr else ""
            seen.update(_children(demo.pid))
            time.sleep(0.2)
        assert any(" serve " in c for c in seen.values()), seen
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_running(p) for p in seen):
        time.sleep(0.2)
    left = {p: c for p, c in seen.items() if _running(p)}
    for p in left:  # leave nothing behind for the next test, then fail
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    assert not left, f"still running after the demo ended: {left}"
    assert demo.returncode != 0
