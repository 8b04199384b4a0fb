"""A request in flight when its engine restarts, through `kvrouter serve`'s proxy.

The simulator (like vLLM once a stream has started) fails a request it had queued with an
error event as the stream's first bytes. The router retries it on the next worker (nothing
reached the client yet), and the records its dispatch wrote on the restarted worker, blocks
that engine never computed, are dropped: the conversation's next turn is not sent back to
the empty cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest

from kvrouter.index.hashing import BlockHasher
from kvrouter.index.scripts import ResidencyIndex
from tests.router.conftest import settle
from tests.support.metrics import parse
from tests.support.simproc import fresh_router, sim_process

MODEL = "sim-model"
B = 16
PROMPT = [(53 * i + 7) % 20_000 for i in range(B * 150 + 5)]  # 2,405 tokens: 1.2 s of prefill


@pytest.fixture(scope="module")
def slow_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two simulated workers prefilling 2,000 tokens/s in real time, KV events off."""
    with sim_process(
        tmp_path_factory.mktemp("sim"),
        "--workers",
        "2",
        "--kv-events",
        "off",
        "--model",
        MODEL,
        "--block-size",
        str(B),
        "--prefill-tokens-per-s",
        "2000",
    ) as fleet:
        yield fleet


@pytest.mark.parametrize("heal", [True, False], ids=["feedback", "no-feedback"])
async def test_a_stream_failed_by_a_restart_is_retried_and_its_records_dropped(
    slow_fleet: dict[str, Any], redis_url: str, redis_client: Any, heal: bool
) -> None:
    workers = slow_fleet["workers"]
    router = await fresh_router(workers, redis_url=redis_url, models=(MODEL,), feedback_heal=heal)
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="k", max_retries=0)
    idx = ResidencyIndex(redis_client)
    keys = BlockHasher(MODEL, B).keys(PROMPT)
    try:

        async def send() -> tuple[str, int]:
            raw = await client.completions.with_raw_response.create(
                model=MODEL,
                prompt=PROMPT,
                max_tokens=2,
                stream=True,
                stream_options={"include_usage": True},
            )
            tokens = 0
            async for chunk in raw.parse():
                tokens += len(chunk.choices[0].text) if chunk.choices else 0
            return raw.headers["x-kvrouter-worker"], tokens

        task = asyncio.ensure_future(send())
        # The dispatch records the prompt on the chosen worker before its engine computes it.
        deadline = time.monotonic() + 10
        while not (depths := (await idx.lookup(MODEL, keys)).depths):
            assert time.monotonic() < deadline, "the request was never dispatched"
            await asyncio.sleep(0.01)
        (first,) = depths
        url = next(w["url"] for w in workers if w["id"] == first)
        async with aiohttp.ClientSession() as http, http.post(url + "/admin/restart") as r:
            assert r.status == 200
        served, _ = await asyncio.wait_for(task, 30)
        assert served != first  # retried: the client saw no error
        await settle(router)
        depths = (await idx.lookup(MODEL, keys)).depths
        if heal:
            assert depths == {served: len(keys)}
        else:
            assert depths == {first: len(keys), served: len(keys)}
        async with aiohttp.ClientSession() as http, http.get(router.url + "/metrics") as r:
            m = parse(await r.text())
        assert m.value("kvrouter_upstream_errors_total", worker=first, kind="stream") == 1
    finally:
        await client.close()
        await router.close()
