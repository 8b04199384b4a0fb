"""`kvrouter inspect` against a real Redis whose contents the test wrote through the real
write paths (records, evictions, leases, the registry, listener ownership), run as a Redis
user that may only read."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from kvrouter.index.keys import KeySchema
from kvrouter.index.scripts import ResidencyIndex
from kvrouter.inspect import inspect_index, render_table
from router_node.registry import register_worker

pytestmark = pytest.mark.redis

M = "llama-inspect"
HOUR = 3_600_000


def _chain(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(n)]


async def _fill(client: Any) -> dict[str, Any]:
    """Known contents: w1 holds chain A (8 blocks) with one block evicted into a hole, w2 holds
    A's first 5 blocks, w3 holds chain B (3 blocks); w1 has one in-flight lease of 100 prefill
    tokens and a registry capacity of 16; listener L1 owns w1 and applied batch 7:42."""
    idx = ResidencyIndex(client)
    schema = KeySchema()
    sec, usec = await client.time()
    now = int(sec) * 1000 + int(usec) // 1000
    a, b = _chain(8, 1), _chain(3, 2)
    await idx.record(M, "w1", a, ttl_new_ms=HOUR, now_ms=now)
    await idx.record(M, "w2", a[:5], ttl_new_ms=HOUR, now_ms=now)
    await idx.record(M, "w3", b, ttl_new_ms=HOUR, now_ms=now)
    await idx.evict(M, "w1", [a[7]], now_ms=now)  # the chain's tail: a hole marked
    await idx.acquire_lease(M, "w1", "lease1", prefill_tokens=100, ttl_ms=HOUR)
    await register_worker(client, schema, "w1", "http://w1:8000", models=(M,), capacity_blocks=16)
    await idx.call(idx.own_worker_call("w1", "L1", lease_ms=60_000))
    # The listener's own bookkeeping, as eviction_listener writes it on its first batch.
    await client.zadd(schema.model(M).listeners, {"L1": now})
    await client.hset(schema.listener_owner("w1"), f"ns:{M}", 1)
    await client.hset(schema.model(M).listener_seq, "w1", "7:42")
    return {"a": a, "b": b, "now": now}


def _check(view: dict[str, Any], known: dict[str, Any]) -> None:
    (model,) = view["models"]
    assert model["model"] == M
    workers = {w["worker"]: w for w in model["workers"]}
    assert set(workers) == {"w1", "w2", "w3"}
    w1 = workers["w1"]
    assert w1["resident_blocks"] == 7 and w1["holes"] == 1
    assert w1["capacity_blocks"] == 16 and w1["capacity_use"] == pytest.approx(7 / 16, abs=1e-4)
    assert (w1["in_flight"], w1["queued_prefill_tokens"], w1["leases"]) == (1, 100, 1)
    assert workers["w2"]["resident_blocks"] == 5 and workers["w2"]["capacity_blocks"] is None
    assert workers["w3"]["resident_blocks"] == 3 and workers["w3"]["leases"] == 0
    # Records written an hour ahead with the default 600 s TTL read as written "50 min from
    # now" - the figure is what the scores say; the test only checks it is consistent.
    assert w1["newest_valid_until_ms"] == pytest.approx(known["now"] + HOUR, abs=5)
    assert w1["oldest_valid_until_ms"] <= w1["newest_valid_until_ms"]
    for figure in ("resident_blocks", "holes", "leases"):
        assert "kvr:{" + M + "}" in w1["read"][figure]
    top = model["shared_prefixes"][0]
    assert top["head"] == f"{known['a'][0]:016x}"
    assert top["workers"] == ["w1", "w2"]
    assert (top["shared_depth"], top["deepest"]) == (5, 7)  # w1 lost its 8th block
    assert model["shared_prefixes"][1]["workers"] == ["w3"]
    (owner,) = view["owners"]
    assert owner["worker"] == "w1" and owner["owner"] == "L1"
    assert 0 < owner["lease_left_ms"] <= 60_000
    assert owner["applied"] == {M: "7:42"}
    assert 0 <= owner["owner_heartbeat_age_ms"] < 60_000
    assert "HGETALL kvr:listener:owner:w1" in owner["read"].values()


async def test_inspect_reports_known_contents(any_client: Any) -> None:
    """On one server and on a 3-master Cluster (SCAN then covers every primary)."""
    known = await _fill(any_client)
    from dataclasses import asdict

    view = await inspect_index(any_client, KeySchema())
    _check(asdict(view), known)
    table = render_table(view)
    assert f"== model {M}" in table and "read  resident_blocks: ZCOUNT" in table
    assert "L1" in table


def _as_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, "", ""))


async def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # In a thread: the Redis client of the test shares this event loop.
    return await asyncio.to_thread(
        subprocess.run, cmd, capture_output=True, text=True, env=env, timeout=60
    )


async def test_inspect_cli_is_read_only(redis_client: Any, redis_url: str) -> None:
    """The command runs as a Redis user allowed only read commands (and TIME), prints the
    same figures as JSON, and a table by default."""
    known = await _fill(redis_client)
    await redis_client.execute_command(
        "ACL", "SETUSER", "inspector", "reset", "on", ">inspect-pw", "~*", "+@read", "+time",
        "+@connection",
    )  # fmt: skip
    try:
        url = _as_user(redis_url, "inspector", "inspect-pw")
        before = await redis_client.dbsize()
        env = {**os.environ, "PYTHONNOUSERSITE": "1"}
        cmd = [sys.executable, "-m", "kvrouter.cli", "inspect", "--redis-url", url]
        out = await _run([*cmd, "--json"], env)
        assert out.returncode == 0, out.stderr
        _check(json.loads(out.stdout), known)
        table = await _run(cmd, env)
        assert table.returncode == 0, table.stderr
        assert "most shared prefixes" in table.stdout and "read  holes: ZCOUNT" in table.stdout
        assert await redis_client.dbsize() == before
        # The user really cannot write: the command would have failed had it tried.
        write = "import redis, sys; redis.Redis.from_url(sys.argv[1]).set('x', 1)"
        denied = await _run([sys.executable, "-c", write, url], env)
        assert denied.returncode != 0 and "NoPermissionError" in denied.stderr
    finally:
        await redis_client.execute_command("ACL", "DELUSER", "inspector")
