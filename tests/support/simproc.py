"""`kvrouter sim` as a child process, the way the router's end-to-end tests start a fleet."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from router_node.app import RouterServer
from router_node.settings import RouterSettings, WorkerSpec


@contextmanager
def sim_process(workdir: Path, *args: str, timeout_s: float = 60.0) -> Iterator[dict[str, Any]]:
    """Run ``kvrouter sim --base-port 0 --ready-file ... <args>``; yield its ready file (the
    workers' ids and URLs) and stop it at the end. Its stderr goes to ``workdir/sim.log``,
    quoted when it exits before it is ready."""
    ready = workdir / "sim.json"
    log_path = workdir / "sim.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvrouter", "sim", "--base-port", "0",
             "--ready-file", str(ready), *args],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout_s
            while not ready.exists():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "kvrouter sim did not start"
                time.sleep(0.05)
            yield json.loads(ready.read_text())
        finally:
            proc.terminate()
            proc.wait(timeout=30)


async def fresh_router(workers: list[dict[str, Any]], **settings: Any) -> RouterServer:
    """Empty the simulated `workers`' prefix caches (a module's fleet: each test starts cold),
    then start a router on them (static discovery, no health probes, its model list read
    every 0.1 s, seeded randomness; `settings` override these and add to them); the caller
    closes it."""
    async with aiohttp.ClientSession() as http:
        for w in workers:
            async with http.post(w["url"] + "/admin/reset_prefix_cache") as r:
                assert r.status == 200
    defaults: dict[str, Any] = {
        "health_interval_s": 0,
        "models_interval_s": 0.1,
        "discovery": "static",
    }
    router = RouterServer(
        RouterSettings(
            host="127.0.0.1",
            port=0,
            workers=tuple(WorkerSpec.parse(f"{w['id']}={w['url']}") for w in workers),
            **{**defaults, **settings},
        ),
        rng=random.Random(0),
    )
    await router.start()
    return router
