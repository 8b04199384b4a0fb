"""Operations: health, readiness, metrics, the debug endpoint, worker health, the registry,
capacity scraping and residency clearing, against real Redis and fake workers."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import aiohttp
import openai
import pytest

from kvrouter.index.keys import KeySchema
from kvrouter.tokenizer import Tokenizer
from router_node.app import POOL, ROUTER
from router_node.models import ModelCatalogue, Resolved
from router_node.registry import deregister_worker, heartbeat, read_registry, register_worker
from tests.router.conftest import (
    MODEL,
    StartRouter,
    get_json,
    openai_client,
    post,
    settle,
    wait_for,
)
from tests.support.fake_worker import FakeWorker
from tests.support.metrics import parse

pytestmark = pytest.mark.redis


async def test_health_ready_models_metrics(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers)
    assert await get_json(router.url + "/health") == (200, {"status": "ok"})
    status, ready = await get_json(router.url + "/ready")
    assert status == 200 and ready["status"] == "ready" and ready["redis"] == "up"
    assert set(ready["workers"]) == {w.id for w in workers}
    models = await openai_client(router).models.list()
    assert [m.id for m in models.data] == [MODEL]
    await openai_client(router).completions.create(model=MODEL, prompt=list(range(64)))
    async with aiohttp.ClientSession() as s, s.get(router.url + "/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    m = parse(text)
    ok = {"endpoint": "completions", "status": "200", "model": MODEL}
    assert m.value("kvrouter_requests_total", **ok) == 1
    assert m.value("kvrouter_requests_total", endpoint="models", status="200", model="") == 1
    no_match = {"policy": "kv", "reason": "no_match", "model": MODEL}
    assert m.value("kvrouter_routing_decisions_total", **no_match) == 1
    assert m.value("kvrouter_matched_tokens_count", model=MODEL) == 1
    assert m.value("kvrouter_matched_tokens_total", model=MODEL) == 0
    # 64 prompt tokens, all counted; none matched on a cold index
    assert m.value("kvrouter_prompt_tokens_total", model=MODEL) == 64
    assert m.value("kvrouter_lookup_seconds_count", model=MODEL) == 1
    assert m.value("kvrouter_redis_up") == 1
    assert m.label_values("kvrouter_worker_requests_total", "worker") <= {w.id for w in workers}
    assert m.value("kvrouter_worker_requests_total") == 1
    assert m.types["kvrouter_upstream_errors_total"] == "counter"
    assert m.types["kvrouter_redis_errors_total"] == "counter"
    assert m.types["kvrouter_matched_tokens"] == "histogram"
    assert m.has("kvrouter_tokenizer_cache", stat="hits")


async def test_debug_route_needs_the_admin_token(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers, admin_token="s3cret-token")
    body = {"model": MODEL, "prompt": list(range(100))}
    url = router.url + "/debug/route"
    assert (await post(url, json=body))[0] == 401
    assert (await post(url, json=body, headers={"Authorization": "Bearer wrong"}))[0] == 401
    assert (await post(url, json=body, headers={"Authorization": "Basic s3cret-token"}))[0] == 401
    await openai_client(router).completions.create(model=MODEL, prompt=list(range(100)))
    await settle(router)
    status, _, raw = await post(url, json=body, headers={"Authorization": "Bearer s3cret-token"})
    assert status == 200
    plan = json.loads(raw)
    assert plan["tokens"] == 100 and plan["blocks"] == 6 and plan["useful_blocks"] == 6
    assert plan["reason"] == "prefix" and plan["indexed"] is True
    chosen = next(w for w in plan["workers"] if w["worker"] == plan["choice"])
    assert chosen["matched_tokens"] == 96 and chosen["cost"] < min(
        w["cost"] for w in plan["workers"] if w["worker"] != plan["choice"]
    )
    # A dry run: nothing was sent to a worker for it.
    assert sum(w.served() for w in workers) == 1
    # Chat bodies too, tokenized with the template.
    chat_body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "return_token_ids": True,
    }
    status, _, raw = await post(
        url, json=chat_body, headers={"Authorization": "Bearer s3cret-token"}
    )
    chat_plan = json.loads(raw)
    assert status == 200 and chat_plan["endpoint"] == "chat"
    assert len(chat_plan["token_ids"]) == chat_plan["tokens"] > 3


async def test_debug_route_is_off_without_a_token(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers)
    status, _, _ = await post(
        router.url + "/debug/route",
        json={"model": MODEL, "prompt": [1]},
        headers={"Authorization": "Bearer "},
    )
    assert status == 403


async def test_passive_ejection_and_residency_cleared_after_grace(
    start_router: StartRouter, workers: list[FakeWorker], redis_client: Any
) -> None:
    router = await start_router(workers[:2], eject_failures=1, eject_s=60, clear_grace_s=0.2)
    client = openai_client(router)
    first = await client.completions.with_raw_response.create(model=MODEL, prompt=list(range(200)))
    wid = first.headers["x-kvrouter-worker"]
    await settle(router)
    bad = next(w for w in workers if w.id == wid)
    wrk_key = KeySchema().model(MODEL).worker(wid)
    assert await redis_client.zcard(wrk_key) == 12
    bad.faults.append("503")
    second = await client.completions.with_raw_response.create(model=MODEL, prompt=list(range(200)))
    assert second.headers["x-kvrouter-worker"] != wid

    _, ready = await get_json(router.url + "/ready")
    assert ready["workers"][wid] == "ejected"

    async def cleared() -> bool:
        return int(await redis_client.zcard(wrk_key)) == 0

    await wait_for(cleared)
    # Ejected: the next requests go elsewhere even with the prefix.
    third = await client.completions.with_raw_response.create(model=MODEL, prompt=list(range(200)))
    assert third.headers["x-kvrouter-worker"] != wid


async def test_active_health_check_takes_a_worker_out_and_back(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers[:2], health_interval_s=0.05)
    down = workers[0]
    await down.stop()

    async def out() -> bool:
        _, ready = await get_json(router.url + "/ready")
        return bool(ready["workers"][down.id] == "unhealthy")

    await wait_for(out)
    for _ in range(4):
        r = await openai_client(router).completions.with_raw_response.create(
            model=MODEL, prompt=[1, 2, 3]
        )
        assert r.headers["x-kvrouter-worker"] == workers[1].id
    await down.start()  # same port

    async def back() -> bool:
        _, ready = await get_json(router.url + "/ready")
        return bool(ready["workers"][down.id] == "up")

    await wait_for(back)


async def test_capacity_scraped_from_vllm_metrics(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    workers[0].num_gpu_blocks = 123
    workers[0].block_size = 32  # engine blocks of 32 tokens = 246 router blocks of 16
    router = await start_router(workers[:1], health_interval_s=0.05)
    pool = router.app[POOL]

    async def scraped() -> bool:
        return pool.workers[workers[0].id].capacity_blocks == 246

    await wait_for(scraped)
    assert pool.workers[workers[0].id].capacity_source == "vllm_metrics"


async def test_configured_capacity_wins_and_trims_the_index(
    start_router: StartRouter, workers: list[FakeWorker], redis_client: Any
) -> None:
    router = await start_router(workers[:1], worker_capacity_blocks=10, health_interval_s=0.05)
    await openai_client(router).completions.create(model=MODEL, prompt=list(range(16 * 30)))
    await settle(router)
    key = KeySchema().model(MODEL).worker(workers[0].id)
    assert await redis_client.zcard(key) == 10
    assert router.app[POOL].workers[workers[0].id].capacity_source == "config"


async def test_registry_workers_join_and_drop_out(
    start_router: StartRouter, workers: list[FakeWorker], redis_client: Any
) -> None:
    schema = KeySchema()
    router = await start_router(
        [], discovery="redis", registry_interval_s=0.05, heartbeat_timeout_s=0.5
    )
    status, _ = await get_json(router.url + "/ready")
    assert status == 503
    w = workers[0]
    await register_worker(
        redis_client, schema, "fake-0", w.url, models=(MODEL,), capacity_blocks=77
    )
    entries = await read_registry(redis_client, schema, max_age_ms=500)
    assert [(e.id, e.url, e.capacity_blocks) for e in entries] == [("fake-0", w.url, 77)]

    async def joined() -> bool:
        status, ready = await get_json(router.url + "/ready")
        return status == 200 and ready["workers"].get("fake-0") == "up"

    await wait_for(joined)
    r = await openai_client(router).completions.with_raw_response.create(
        model=MODEL, prompt=[1, 2, 3]
    )
    assert r.headers["x-kvrouter-worker"] == "fake-0"
    assert router.app[POOL].workers["fake-0"].capacity_blocks == 77

    # No more heartbeats: it drops out.
    async def lapsed() -> bool:
        _, ready = await get_json(router.url + "/ready")
        return ready["workers"].get("fake-0") in (None, "deregistered")

    await wait_for(lapsed)
    status, _, _ = await post(router.url + "/v1/completions", json={"model": MODEL, "prompt": [1]})
    assert status == 503

    await heartbeat(redis_client, schema, "fake-0")
    await wait_for(joined)
    await deregister_worker(redis_client, schema, "fake-0")
    await wait_for(lapsed)
    assert await read_registry(redis_client, schema, max_age_ms=60_000) == []


async def test_registry_skips_bad_entries(redis_client: Any) -> None:
    schema = KeySchema()
    await redis_client.hset(schema.registry, "broken", "{not json")
    await redis_client.hset(schema.registry, "nourl", "{}")
    await heartbeat(redis_client, schema, "broken")
    await heartbeat(redis_client, schema, "nourl")
    await register_worker(redis_client, schema, "good", "http://127.0.0.1:9")
    assert [e.id for e in await read_registry(redis_client, schema, max_age_ms=60_000)] == ["good"]
    with pytest.raises(ValueError):
        await register_worker(redis_client, schema, "x", "ftp://nope")


class _CountingCatalogue(ModelCatalogue):
    """The router's own catalogue, counting how often a model name is resolved."""

    calls: ClassVar[list[str]] = []

    def resolve(self, name: str, listed_parent: str | None = None) -> Resolved | None:
        self.calls.append(name)
        return super().resolve(name, listed_parent)


async def test_one_resolution_per_request(
    start_router: StartRouter, workers: list[FakeWorker], tokenizer: Tokenizer
) -> None:
    """parse_request resolves the model once; tokenizing and planning use that result."""
    router = await start_router(workers, admin_token="s3cret-token")
    r = router.app[ROUTER]
    r.catalogue = _CountingCatalogue(r.catalogue.bases, r.catalogue.adapters)
    resolved = r.resolve(MODEL)
    assert resolved is not None and resolved.tokenizer is tokenizer
    assert resolved.scoring is r.configs[MODEL] and resolved.hasher is resolved.base.hasher
    _CountingCatalogue.calls.clear()
    client = openai_client(router)
    await client.completions.create(model=MODEL, prompt="one resolution, text prompt")
    await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "one resolution, chat"}]
    )
    status, _, _ = await post(
        router.url + "/debug/route",
        json={"model": MODEL, "prompt": "a dry run"},
        headers={"Authorization": "Bearer s3cret-token"},
    )
    assert status == 200
    assert _CountingCatalogue.calls == [MODEL, MODEL, MODEL]
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="nobody", prompt="x")
    assert _CountingCatalogue.calls[3:] == ["nobody"]
