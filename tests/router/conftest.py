"""Router fixtures: a real BPE tokenizer, fake vLLM workers on loopback, and routers over the
session's real Redis (flushed per test through the `redis_client` fixture)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from kvrouter.tokenizer import Tokenizer
from kvrouter.tokenizer.testing import build_test_tokenizer
from router_node.app import TASKS, RouterServer
from router_node.settings import RouterSettings, WorkerSpec
from tests.support.clients import closed_after_test
from tests.support.fake_worker import FakeWorker

MODEL = "test-model"
StartRouter = Callable[..., Awaitable[RouterServer]]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_tokenizer(tmp_path_factory.mktemp("router-tok"), "llama3")


@pytest.fixture(scope="session")
def tokenizer(tok_dir: Path) -> Tokenizer:
    return Tokenizer.load(tok_dir)


@pytest.fixture
async def workers(tokenizer: Tokenizer) -> AsyncIterator[list[FakeWorker]]:
    """Three fake vLLM workers that tokenize like the router and model a prefix cache."""
    ws = [FakeWorker(model=MODEL, tokenizer=tokenizer) for _ in range(3)]
    for w in ws:
        await w.start()
    yield ws
    for w in ws:
        await w.stop()


def settings_for(redis_url: str, workers: list[FakeWorker], **kw: Any) -> RouterSettings:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "redis_url": redis_url,
        "models": (MODEL,),
        "workers": tuple(WorkerSpec.parse(w.url) for w in workers),
        "health_interval_s": 0,
        "discovery": "static",
    }
    base.update(kw)
    return RouterSettings(**base)


@pytest.fixture
async def start_router(
    redis_url: str, redis_client: Any, tokenizer: Tokenizer
) -> AsyncIterator[StartRouter]:
    """Start routers (closed at the end); Redis is flushed first by `redis_client`."""
    servers: list[RouterServer] = []

    async def start(workers: list[FakeWorker], **kw: Any) -> RouterServer:
        kw.setdefault("redis_url", redis_url)
        source = kw.pop("endpoint_source", None)
        settings = settings_for(kw.pop("redis_url"), workers, **kw)
        server = RouterServer(
            settings,
            tokenizer=tokenizer,
            rng=random.Random(len(servers)),
            endpoint_source=source,
        )
        await server.start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        await s.close()


def openai_client(server: RouterServer) -> AsyncOpenAI:
    """A client on `server`, closed when the test ends."""
    # max_retries=0: a failure the router let through must show, not be retried away.
    return closed_after_test(
        AsyncOpenAI(base_url=server.url + "/v1", api_key="test-key", max_retries=0)
    )


async def wait_for(check: Callable[[], Awaitable[bool]], limit_s: float = 10.0) -> None:
    """Poll `check` until it is true (bounded; fails the test after `limit_s`)."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def get_json(url: str, **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:
        return r.status, await r.json(content_type=None)


async def post(url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.post(url, **kw) as r:
        return r.status, dict(r.headers), await r.read()


async def settle(*routers: RouterServer) -> None:
    """Wait for the routers' background Redis work (the dispatch record + lease, releases).

    The router answers without waiting for it (it runs concurrently with the upstream call);
    a test that sends a follow-up request and asserts on routing waits for it explicitly.
    """
    for r in routers:
        await r.app[TASKS].drain()
