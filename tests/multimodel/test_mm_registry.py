"""Models from the Redis registry: a worker registers the models it serves, adapters with their
base model, and the router routes by them (no /v1/models polling here)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import openai
import pytest

from kvrouter.index.keys import KeySchema
from router_node.app import POOL, RouterServer
from router_node.registry import read_registry, register_worker
from router_node.settings import RouterSettings
from tests.support.fake_worker import FakeWorker

pytestmark = pytest.mark.redis
LLAMA, QWEN, LORA = "llama", "qwen", "reg-lora"


async def test_registry_models_and_adapters_route_requests(
    redis_url: str, redis_client: Any
) -> None:
    schema = KeySchema()
    async with FakeWorker(model=LLAMA) as wl, FakeWorker(model=QWEN) as wq:
        await register_worker(
            redis_client, schema, "llama-0", wl.url, models=(LLAMA, LORA), adapters={LORA: LLAMA}
        )
        await register_worker(redis_client, schema, "qwen-0", wq.url, models=(QWEN,))
        entries = {e.id: e for e in await read_registry(redis_client, schema, max_age_ms=5000)}
        assert entries["llama-0"].adapters == ((LORA, LLAMA),)
        settings = RouterSettings(
            host="127.0.0.1", port=0, redis_url=redis_url, models=(LLAMA, QWEN),
            discovery="redis", registry_interval_s=0.05, health_interval_s=0,
            models_interval_s=0,
        )  # fmt: skip
        async with RouterServer(settings, rng=random.Random(0)) as router:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while len(router.app[POOL].workers) < 2:
                assert loop.time() < deadline, "registry workers never joined"
                await asyncio.sleep(0.02)
            client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="k", max_retries=0)
            try:
                page = await client.models.list()
                got = {m.id: (m.model_extra or {}).get("parent") for m in page.data}
                assert got == {LLAMA: None, LORA: LLAMA, QWEN: None}
                for model, where in ((LORA, "llama-0"), (QWEN, "qwen-0"), (LLAMA, "llama-0")):
                    for k in range(3):
                        r = await client.completions.with_raw_response.create(
                            model=model, prompt=[k + 1] * 40
                        )
                        assert r.headers["x-kvrouter-worker"] == where
                with pytest.raises(openai.NotFoundError, match="other-lora"):
                    await client.completions.create(model="other-lora", prompt=[1])
            finally:
                await client.close()
