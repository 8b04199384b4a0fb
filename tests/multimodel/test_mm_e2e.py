"""Multi-model fleets end to end: the official openai client -> one router -> fake vLLM workers
serving two base models and two LoRA adapters, over real Redis.

Fleet (each fake worker lists its models on /v1/models, adapters with their parent, and
answers 404 for any other model, as vLLM does):

    w0: llama, sql-lora, chat-lora      w3: qwen
    w1: llama, sql-lora                 w4: qwen
    w2: llama
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from router_node.app import POOL, TASKS, RouterServer
from router_node.settings import RouterSettings, WorkerSpec
from tests.support.fake_worker import FakeWorker, route_depths

pytestmark = pytest.mark.redis

LLAMA, QWEN = "llama", "qwen"
SQL, CHAT = "sql-lora", "chat-lora"
B = 16
ADMIN = "admin-token"
FLEET: list[tuple[str, ...]] = [
    (LLAMA, SQL, CHAT),
    (LLAMA, SQL),
    (LLAMA,),
    (QWEN,),
    (QWEN,),
]
PARENTS = {SQL: LLAMA, CHAT: LLAMA}
SERVES = {m: {i for i, served in enumerate(FLEET) if m in served} for m in (LLAMA, QWEN, SQL, CHAT)}


def prompt(seed: int, n_blocks: int = 8, tail: int = 5) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 30_000) for _ in range(n_blocks * B + tail)]


@pytest.fixture
async def fleet() -> AsyncIterator[list[FakeWorker]]:
    ws = [
        FakeWorker(
            model=served[0],
            block_size=B,
            model_list=served,
            adapters={a: PARENTS[a] for a in served if a in PARENTS},
        )
        for served in FLEET
    ]
    for w in ws:
        await w.start()
    yield ws
    for w in ws:
        await w.stop()


@pytest.fixture
async def start(redis_url: str, redis_client: Any) -> AsyncIterator[Any]:
    servers: list[RouterServer] = []

    async def start(workers: list[FakeWorker], **kw: Any) -> RouterServer:
        base: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "redis_url": redis_url,
            "models": (LLAMA, QWEN),
            "workers": tuple(WorkerSpec.parse(w.url) for w in workers),
            "health_interval_s": 0,
            "models_interval_s": 0.1,
            "admin_token": ADMIN,
            "block_size": B,
        }
        base.update(kw)
        server = RouterServer(RouterSettings(**base), rng=random.Random(7))
        await server.start()
        servers.append(server)
        # Wait until the first /v1/models poll of every worker is in.
        deadline = asyncio.get_running_loop().time() + 10
        while any(w.listed is None for w in server.app[POOL].workers.values()):
            assert asyncio.get_running_loop().time() < deadline, "workers never polled"
            await asyncio.sleep(0.02)
        return server

    yield start
    for s in servers:
        c = _CLIENTS.pop(s, None)
        if c is not None:
            await c.close()
        await s.close()


_CLIENTS: dict[RouterServer, AsyncOpenAI] = {}


def client(server: RouterServer) -> AsyncOpenAI:
    """One client per router (closed with it)."""
    c = _CLIENTS.get(server)
    if c is None:
        c = _CLIENTS[server] = AsyncOpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    return c


async def complete(server: RouterServer, model: str, ids: list[int]) -> tuple[int, int, int]:
    """(worker index, router's matched tokens, engine's cached tokens) of one request."""
    raw = await client(server).completions.with_raw_response.create(
        model=model, prompt=ids, max_tokens=2
    )
    await server.app[TASKS].drain()  # the dispatch record is in before the next request
    body = raw.parse()
    assert body.model == model
    wid = raw.headers["x-kvrouter-worker"]
    port = int(wid.rsplit(":", 1)[1])
    index = next(i for i, w in enumerate(_FLEET_PORTS[server]) if w == port)
    assert body.usage is not None and body.usage.prompt_tokens_details is not None
    cached = body.usage.prompt_tokens_details.cached_tokens or 0
    return index, int(raw.headers["x-kvrouter-matched-tokens"]), cached


_FLEET_PORTS: dict[RouterServer, list[int]] = {}


async def router_for(start: Any, fleet: list[FakeWorker], **kw: Any) -> RouterServer:
    server: RouterServer = await start(fleet, **kw)
    _FLEET_PORTS[server] = [w.port for w in fleet]
    return server


async def test_v1_models_is_the_union_of_the_fleet(start: Any, fleet: list[FakeWorker]) -> None:
    server = await router_for(start, fleet)
    page = await client(server).models.list()
    got = {m.id: (m.model_extra or {}).get("parent") for m in page.data}
    assert got == {LLAMA: None, QWEN: None, SQL: LLAMA, CHAT: LLAMA}
    # The union follows the fleet: with w0 down, chat-lora is served by no one.
    await fleet[0].stop()
    server.app[POOL].workers[fleet[0].id].healthy = False
    page = await client(server).models.list()
    assert {m.id for m in page.data} == {LLAMA, QWEN, SQL}


async def test_each_request_lands_only_on_a_worker_serving_its_model(
    start: Any, fleet: list[FakeWorker]
) -> None:
    server = await router_for(start, fleet)
    for i in range(40):
        model = (LLAMA, QWEN, SQL, CHAT)[i % 4]
        index, _, _ = await complete(server, model, prompt(1000 + i, n_blocks=2))
        assert index in SERVES[model], (model, index)
    for i, w in enumerate(fleet):
        got = {r["body"]["model"] for r in w.requests}
        assert got <= set(FLEET[i]), (i, got)
    # Every model was served, by more than one worker where it can be.
    for model in (LLAMA, QWEN, SQL):
        used = {
            i for i, w in enumerate(fleet) if any(r["body"]["model"] == model for r in w.requests)
        }
        assert len(used) >= 2, (model, used)


@pytest.mark.parametrize("model", [LLAMA, QWEN, SQL, CHAT])
async def test_prefix_affinity_holds_per_model_and_adapter(
    start: Any, fleet: list[FakeWorker], model: str
) -> None:
    server = await router_for(start, fleet)
    # Some unrelated traffic on the other models first.
    for j, other in enumerate(m for m in (LLAMA, QWEN, SQL, CHAT) if m != model):
        await complete(server, other, prompt(50 + j))
    shared = prompt(1, n_blocks=10, tail=0)
    first, matched, _ = await complete(server, model, [*shared, *prompt(2, 1)])
    assert matched == 0
    for k in range(3, 7):
        index, matched, cached = await complete(server, model, [*shared, *prompt(k, 1)])
        assert index == first
        # The router's match is the engine's own: the same blocks, adapter included.
        assert matched == cached >= 10 * B


async def test_the_same_prompt_under_two_adapters_never_shares_blocks(
    start: Any, fleet: list[FakeWorker], redis_client: Any
) -> None:
    server = await router_for(start, fleet)
    ids = prompt(9, n_blocks=12)
    w_sql, _, _ = await complete(server, SQL, ids)
    again, matched, _ = await complete(server, SQL, ids)
    assert (again, matched) == (w_sql, 12 * B)
    # chat-lora is loaded on w0 only, which may well be where sql-lora went: still no match.
    index, matched, cached = await complete(server, CHAT, ids)
    assert (index, matched, cached) == (0, 0, 0)
    # Nor does the base model match either adapter's blocks, on any worker.
    for model in (LLAMA, SQL, CHAT):
        depths = await route_depths(server.url, model, ids, ADMIN)
        if model == LLAMA:
            assert set(depths.values()) == {0}
        else:
            assert max(depths.values()) == 12
    # Each adapter's blocks live in its own namespace (hash tag), apart from the base model's.
    keys = {k if isinstance(k, str) else k.decode() for k in await redis_client.keys("kvr:*")}
    assert any(k.startswith(f"kvr:{{{SQL}}}:") for k in keys)
    assert any(k.startswith(f"kvr:{{{CHAT}}}:") for k in keys)
    assert not any(k.startswith(f"kvr:{{{LLAMA}}}:blk") for k in keys)


async def test_one_models_traffic_never_reads_anothers_keys(
    start: Any, fleet: list[FakeWorker], redis_url: str
) -> None:
    """Redis MONITOR sees every command: the keys of qwen's requests all carry {qwen}."""
    import redis.asyncio as aioredis

    server = await router_for(start, fleet)
    for model in (LLAMA, SQL, CHAT):  # other models' state exists and is live
        await complete(server, model, prompt(5))
    mon_client = aioredis.Redis.from_url(redis_url)
    seen: list[str] = []
    try:
        async with mon_client.monitor() as m:

            async def collect() -> None:
                async for info in m.listen():
                    seen.append(str(info.get("command", "")))

            task = asyncio.create_task(collect())
            await asyncio.sleep(0.1)
            for k in range(5):
                await complete(server, QWEN, prompt(5) if k == 0 else prompt(300 + k))
            await asyncio.sleep(0.2)
            task.cancel()
    finally:
        await mon_client.aclose()
    scripts = [c for c in seen if c.upper().startswith(("EVALSHA", "EVAL "))]
    assert len(scripts) >= 10  # a lookup and a dispatch per request, at least
    tagged = [tok for c in scripts for tok in c.split() if "{" in tok]
    assert tagged and all(f"{{{QWEN}}}" in tok for tok in tagged), tagged


async def test_an_adapter_nobody_serves_is_a_404_that_names_it(
    start: Any, fleet: list[FakeWorker], tmp_path: Any
) -> None:
    server = await router_for(start, fleet)
    with pytest.raises(openai.NotFoundError, match="ghost-lora") as e:
        await client(server).completions.create(model="ghost-lora", prompt=prompt(1))
    assert e.value.body["code"] == "model_not_found"  # type: ignore[index]
    # A configured adapter that no worker has loaded (placement loaded_only): 404 naming it.
    from router_node.models import ModelConfig

    server2 = await router_for(
        start,
        fleet,
        models=(LLAMA, QWEN, "cfg-lora"),
        model_configs=(ModelConfig("cfg-lora", parent=LLAMA),),
    )
    with pytest.raises(openai.NotFoundError, match="cfg-lora"):
        await client(server2).completions.create(model="cfg-lora", prompt=prompt(1))
    assert all(r["body"].get("model") != "cfg-lora" for w in fleet for r in w.requests)


async def test_any_base_worker_places_an_adapter_and_prefers_loaded_workers(
    start: Any, fleet: list[FakeWorker]
) -> None:
    from router_node.models import ModelConfig

    server = await router_for(
        start,
        fleet,
        models=(LLAMA, QWEN, "new-lora"),
        model_configs=(ModelConfig("new-lora", parent=LLAMA, lora_path="/adapters/new"),),
        lora_placement="any_base_worker",
    )
    names = {m.id for m in (await client(server).models.list()).data}
    assert "new-lora" in names  # servable by any llama worker
    index, _, _ = await complete(server, "new-lora", prompt(77))
    assert index in SERVES[LLAMA]
    loads = [r for r in fleet[index].requests if r["path"] == "/v1/load_lora_adapter"]
    assert loads and loads[0]["body"] == {"lora_name": "new-lora", "lora_path": "/adapters/new"}
    assert not any(
        r["path"] == "/v1/load_lora_adapter"
        for i, w in enumerate(fleet)
        if i != index
        for r in w.requests
    )
    # An adapter some worker has loaded goes there, cold prompts included, at equal load.
    for k in range(5):
        i, _, _ = await complete(server, SQL, prompt(400 + k))
        assert i in SERVES[SQL]
    # Never to a worker of the other base model.
    for k in range(5):
        i, _, _ = await complete(server, "new-lora", prompt(500 + k))
        assert i in SERVES[LLAMA]


async def test_an_adapter_unloaded_since_the_last_poll_is_retried_elsewhere(
    start: Any, fleet: list[FakeWorker]
) -> None:
    server = await router_for(start, fleet, models_interval_s=3600)  # one poll, at start
    # w1 unloads sql-lora; the router does not know yet.
    fleet[1].model_list = (LLAMA,)
    for k in range(6):
        index, _, _ = await complete(server, SQL, prompt(900 + k))
        assert index == 0
    assert sum(1 for r in fleet[1].requests if r["body"]["model"] == SQL) <= 1
    assert SQL not in (server.app[POOL].workers[fleet[1].id].listed or ())
    # Nobody has it any more: the client gets the engines' 404, naming it.
    fleet[0].model_list = (LLAMA, CHAT)
    with pytest.raises(openai.NotFoundError, match=SQL):
        await client(server).completions.create(model=SQL, prompt=prompt(1))
