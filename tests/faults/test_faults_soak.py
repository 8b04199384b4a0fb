"""Soak (marker `soak`, not in CI): three router replicas, the listener and four workers under
a constant load of ever-new conversations for KVR_SOAK_S seconds (default 180), sampling each
router's RSS and Redis used_memory and key count. The index is bounded by capacity trims
(256 blocks per worker) and expiry (records live 20 s), so after warm-up both must be flat.

    KVR_SOAK_S=600 PYTHONPATH=. python -m pytest tests/faults/test_faults_soak.py -m soak -s
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from kvrouter.redisproc import RedisServer
from tests.support import faults

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]

CAPACITY_BLOCKS = 256


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def test_soak_memory_is_flat(reliability: Any) -> None:
    duration = float(os.environ.get("KVR_SOAK_S", "180"))
    server = RedisServer().start()
    stack = faults.Stack(
        server.url,
        workers=4,
        replicas=3,
        sim_args=["--time-scale", "20", "--capacity-tokens", str(CAPACITY_BLOCKS * faults.BLOCK)],
        router_env={
            "KVR_WORKER_CAPACITY_BLOCKS": str(CAPACITY_BLOCKS),
            "KVR_RECORD_TTL_S": "20",
            "KVR_SPECULATIVE_TTL_S": "10",
            "KVR_LOG_LEVEL": "warning",
        },
        listener_env={
            "KVR_WORKER_CAPACITY_BLOCKS": str(CAPACITY_BLOCKS),
            "KVR_RECORD_TTL_S": "20",
        },
    )
    load = faults.Load("", concurrency=12, conversations=1_000_000, max_tokens=8)
    samples: list[tuple[float, list[int], int, int]] = []
    admin = redis.Redis(port=server.port)
    total = failed = 0
    try:
        await stack.start()
        load.urls = stack.router_urls
        await load.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < duration:
            await asyncio.sleep(max(1.0, duration / 40))
            pids = [p.proc.pid for p in stack.routers if p.proc is not None]
            mem = int(admin.info("memory")["used_memory"])
            samples.append((time.monotonic() - t0, [rss_kib(p) for p in pids], mem, admin.dbsize()))
            # Bound the test process's own memory: keep only the last outcomes.
            if len(load.outcomes) > 5000:
                old = load.outcomes[:-1000]
                total += len(old)
                failed += sum(not o.ok for o in old)
                del load.outcomes[:-1000]
        await load.stop()
    finally:
        await load.stop()
        await stack.close()
        admin.close()
        server.close()
    total += len(load.outcomes)
    failed += sum(not o.ok for o in load.outcomes)
    for t, rss, mem, keys in samples:
        print(f"{t:7.1f}s rss_kib={rss} redis_used={mem} keys={keys}")
    n = len(samples)
    warm = samples[n // 3 : 2 * n // 3]
    late = samples[2 * n // 3 :]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    rss_growth = max(
        mean([s[1][i] for s in late]) / mean([s[1][i] for s in warm]) - 1
        for i in range(len(samples[0][1]))
    )
    redis_growth = mean([s[2] for s in late]) / mean([s[2] for s in warm]) - 1
    reliability.add("soak", {
        "run": f"{duration:.0f} s, 3 routers, 4 workers, 12 clients, new conversations only",
        "requests": total,
        "failed": failed,
        "router RSS (KiB) first/middle/last": "; ".join(
            f"{samples[0][1][i]}/{samples[n // 2][1][i]}/{samples[-1][1][i]}"
            for i in range(len(samples[0][1]))
        ),
        "router RSS growth, last third vs middle": f"{rss_growth:+.1%}",
        "Redis used_memory first/middle/last": f"{samples[0][2]}/{samples[n // 2][2]}/"
                                               f"{samples[-1][2]}",
        "Redis growth, last third vs middle": f"{redis_growth:+.1%}",
        "keys last": samples[-1][3],
    })  # fmt: skip
    assert failed == 0
    assert rss_growth < 0.10
    assert redis_growth < 0.10
