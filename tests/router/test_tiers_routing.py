"""Routing with lower storage tiers (#17 item 7), through a real router over a real Redis:
a worker that holds the prompt on its CPU tier beats a cold one, and one that holds it on the
GPU beats the CPU tier. Records are written with the index scripts the listener uses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvrouter.index.scripts import ResidencyIndex, pack_u64
from router_node.app import ROUTER
from tests.router.conftest import MODEL, StartRouter, post
from tests.support.fake_worker import FakeWorker

TOKEN = "s3cret-token"
PROMPT = list(range(100))  # 6 useful blocks of 16


async def route(url: str, **body: Any) -> dict[str, Any]:
    status, _, raw = await post(
        url + "/debug/route",
        json={"model": MODEL, "prompt": PROMPT, **body},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 200, raw
    return dict(json.loads(raw))


async def store_cpu(idx: ResidencyIndex, worker: str, keys: list[int]) -> None:
    fields = pack_u64([x for i, k in enumerate(keys) for x in (i + 1, k)])
    await idx.store_tier_blocks(MODEL, worker, "CPU", "S" * len(keys), fields, ttl_ms=60_000)


async def test_cpu_tier_beats_cold_and_gpu_beats_cpu_tier(
    start_router: StartRouter, workers: list[FakeWorker], redis_client: Any
) -> None:
    router = await start_router(workers, admin_token=TOKEN)
    idx = ResidencyIndex(redis_client)
    routed = router.app[ROUTER].resolve(MODEL)
    assert routed is not None
    keys = routed.keys(PROMPT)[:6]
    cold = await route(router.url)
    ids = sorted(w["worker"] for w in cold["workers"])
    assert all(w["tier_blocks"] == {} for w in cold["workers"])
    a, b = ids[0], ids[1]

    await store_cpu(idx, a, keys)
    plan = await route(router.url)
    assert plan["choice"] == a
    by = {w["worker"]: w for w in plan["workers"]}
    assert by[a]["tier_blocks"] == {"CPU": 6} and by[a]["matched_blocks"] == 0
    assert by[a]["tier_credit_blocks"] == 6 * 0.8  # llm-d's CPU credit, the default
    assert by[a]["cost"] < by[b]["cost"]

    await idx.record(MODEL, b, keys, ttl_new_ms=60_000)
    plan = await route(router.url)
    assert plan["choice"] == b
    by = {w["worker"]: w for w in plan["workers"]}
    assert by[b]["matched_blocks"] == 6 and by[b]["cost"] < by[a]["cost"]


async def test_tier_credit_zero_ignores_tiers(
    start_router: StartRouter, workers: list[FakeWorker], redis_client: Any
) -> None:
    router = await start_router(workers, admin_token=TOKEN, tier_credits=("CPU=0",))
    idx = ResidencyIndex(redis_client)
    routed = router.app[ROUTER].resolve(MODEL)
    assert routed is not None
    ids = sorted(w["worker"] for w in (await route(router.url))["workers"])
    await store_cpu(idx, ids[0], routed.keys(PROMPT)[:6])
    plan = await route(router.url)
    assert all(w["tier_blocks"] == {} and w["tier_credit_blocks"] == 0 for w in plan["workers"])


def test_tier_credits_are_checked() -> None:
    from router_node.settings import RouterSettings

    s = RouterSettings(models=(MODEL,), tier_credits=("CPU=0.75", "DISK=0"))
    assert s.tier_credit_map == {"CPU": 0.75}
    assert RouterSettings(models=(MODEL,)).tier_credit_map == {"CPU": 0.8, "DISK": 0.25}
    for bad in ("CPU", "CPU=1.5", "GPU=0.5", "C P U=0.5", "CPU=x"):
        with pytest.raises(ValueError, match=r"(?i)tier_credits"):
            RouterSettings(models=(MODEL,), tier_credits=(bad,))
