"""A request in flight when its engine restarts, through `kvrouter serve`'s proxy.

The simulator (like vLLM once a stream has started) fails a request it had queued with an
error event as the stream's first bytes. The router retries it on the next worker (nothing
reached the client yet), and the records its dispatch wrote on the restarted worker, blocks
that engine never computed, are dropped: the conversation's next turn is not sent back to
the empty cache. The abort also shows the engine restarted: the worker's other records,
here those of an earlier request whose prompt shares the first half of this one's, go at once
(KVR_FEEDBACK_ABORT_CLEAR), before any request completes there to show they are gone.
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
from tests.support.faults import wait_http
from tests.support.metrics import parse
from tests.support.simproc import fresh_router, sim_process

MODEL = "sim-model"
B = 16
PROMPT = [(53 * i + 7) % 20_000 for i in range(B * 150 + 5)]  # 2,405 tokens: 1.2 s of prefill
SHARED = B * 75  # the earlier request's prompt: PROMPT's first 75 blocks, then its own
EARLIER = PROMPT[:SHARED] + [(31 * i + 3) % 20_000 for i in range(B * 10)]


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


@pytest.mark.parametrize(
    ("heal", "abort_clear"),
    [(True, True), (True, False), (False, True)],
    ids=["feedback", "no-abort-clear", "no-feedback"],
)
async def test_a_stream_failed_by_a_restart_is_retried_and_its_records_dropped(
    slow_fleet: dict[str, Any],
    redis_url: str,
    redis_client: Any,
    heal: bool,
    abort_clear: bool,
) -> None:
    workers = slow_fleet["workers"]
    router = await fresh_router(
        workers,
        redis_url=redis_url,
        models=(MODEL,),
        feedback_heal=heal,
        feedback_abort_clear=abort_clear,
    )
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="k", max_retries=0)
    idx = ResidencyIndex(redis_client)
    hasher = BlockHasher(MODEL, B)
    keys, earlier = hasher.keys(PROMPT), hasher.keys(EARLIER)
    try:

        async def send(prompt: list[int]) -> tuple[str, int]:
            raw = await client.completions.with_raw_response.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=2,
                stream=True,
                stream_options={"include_usage": True},
            )
            tokens = 0
            async for chunk in raw.parse():
                tokens += len(chunk.choices[0].text) if chunk.choices else 0
            return raw.headers["x-kvrouter-worker"], tokens

        # An earlier request leaves the shared half on one worker; the next one follows it.
        first, _ = await send(EARLIER)
        await settle(router)
        task = asyncio.ensure_future(send(PROMPT))
        # The dispatch records the prompt on the chosen worker before its engine computes it.
        deadline = time.monotonic() + 10
        while (await idx.lookup(MODEL, keys)).depths.get(first, 0) < len(keys):
            assert time.monotonic() < deadline, "the request was never dispatched to " + first
            await asyncio.sleep(0.01)
        url = next(w["url"] for w in workers if w["id"] == first)
        async with aiohttp.ClientSession() as http, http.post(url + "/admin/restart") as r:
            assert r.status == 200
        served, _ = await asyncio.wait_for(task, 30)
        assert served != first  # retried: the client saw no error
        await settle(router)
        depths = (await idx.lookup(MODEL, keys)).depths
        if not heal:
            assert depths == {first: len(keys), served: len(keys)}
        elif abort_clear:
            # Nothing of the restarted engine's is left, not only this attempt's records.
            assert depths == {served: len(keys)}
            assert first not in (await idx.lookup(MODEL, earlier)).depths
        else:
            # Only what the failed attempt recorded past the worker's match is dropped.
            assert depths == {first: SHARED // B, served: len(keys)}
        async with aiohttp.ClientSession() as http, http.get(router.url + "/metrics") as r:
            m = parse(await r.text())
        assert m.value("kvrouter_upstream_errors_total", worker=first, kind="stream") == 1
        if heal and abort_clear:
            assert m.value("kvrouter_index_abort_clears_total", model=MODEL, worker=first) == 1
        else:
            assert not m.has("kvrouter_index_abort_clears_total", model=MODEL, worker=first)
    finally:
        await client.close()
        await router.close()


async def _warm(router: Any, client: openai.AsyncOpenAI) -> str:
    """Send EARLIER once through `router`; returns the worker that computed it, once the
    router has recorded it."""
    done = await client.completions.with_raw_response.create(
        model=MODEL, prompt=EARLIER, max_tokens=2
    )
    await settle(router)
    return done.headers["x-kvrouter-worker"]


async def test_a_restart_that_aborts_a_running_stream_drops_the_workers_records(
    slow_fleet: dict[str, Any], redis_url: str, redis_client: Any
) -> None:
    """A stream already answering when its engine restarts ends with the engine's error event
    (the client sees it: tokens were sent), and the worker's records go with it."""
    workers = slow_fleet["workers"]
    router = await fresh_router(workers, redis_url=redis_url, models=(MODEL,))
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="k", max_retries=0)
    idx = ResidencyIndex(redis_client)
    earlier = BlockHasher(MODEL, B).keys(EARLIER)
    try:
        first = await _warm(router, client)
        url = next(w["url"] for w in workers if w["id"] == first)
        # The same prompt again follows its records; 300 decode steps of 10 ms keep it running.
        raw = await client.completions.with_raw_response.create(
            model=MODEL, prompt=EARLIER, max_tokens=300, stream=True
        )
        assert raw.headers["x-kvrouter-worker"] == first
        stream = raw.parse()
        chunks = 0
        with pytest.raises(openai.APIError, match="restart"):
            async for _ in stream:
                chunks += 1
                if chunks == 3:
                    async with (
                        aiohttp.ClientSession() as http,
                        http.post(url + "/admin/restart") as r,
                    ):
                        assert r.status == 200
        assert 3 <= chunks < 300
        await settle(router)
        assert first not in (await idx.lookup(MODEL, earlier)).depths
        async with aiohttp.ClientSession() as http, http.get(router.url + "/metrics") as r:
            m = parse(await r.text())
        assert m.value("kvrouter_index_abort_clears_total", model=MODEL, worker=first) == 1
    finally:
        await client.close()
        await router.close()


@pytest.mark.parametrize("refused_clear", [True, False], ids=["refused-clear", "off"])
async def test_an_idle_restart_with_downtime_is_healed_before_any_request(
    slow_fleet: dict[str, Any], redis_url: str, redis_client: Any, refused_clear: bool
) -> None:
    """An engine that restarts while idle aborts nothing; while it is down its port refuses
    connections, which the router's health check sees: its records go before any request is
    sent to the empty cache (KVR_FEEDBACK_REFUSED_CLEAR), once for the whole outage."""
    workers = slow_fleet["workers"]
    router = await fresh_router(
        workers,
        redis_url=redis_url,
        models=(MODEL,),
        health_interval_s=0.1,
        feedback_refused_clear=refused_clear,
    )
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="k", max_retries=0)
    idx = ResidencyIndex(redis_client)
    earlier = BlockHasher(MODEL, B).keys(EARLIER)
    try:
        first = await _warm(router, client)
        assert (await idx.lookup(MODEL, earlier)).depths.get(first) == len(earlier)
        url = next(w["url"] for w in workers if w["id"] == first)
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/admin/restart?down_s=1.0") as r:
                assert r.status == 200 and (await r.json())["aborted"] == 0

            async def clears() -> float:
                async with http.get(router.url + "/metrics") as r:
                    m = parse(await r.text())
                name = "kvrouter_index_refused_clears_total"
                return m.value(name, model=MODEL, worker=first) if m.has(name) else 0.0

            deadline = time.monotonic() + 5
            if refused_clear:
                while first in (await idx.lookup(MODEL, earlier)).depths:
                    assert time.monotonic() < deadline, "the outage never dropped the records"
                    await asyncio.sleep(0.05)
            # Back up: several health checks refused in between, one clear.
            await wait_http(url + "/health", limit_s=max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(0.3)  # a passing check ends the outage for the router too
            assert await clears() == (1.0 if refused_clear else 0.0)
        if not refused_clear:
            assert (await idx.lookup(MODEL, earlier)).depths.get(first) == len(earlier)
    finally:
        await client.close()
        await router.close()
