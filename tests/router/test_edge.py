"""The hardened edge (router_node/edge.py): header read timeout and header limits, the
per-client rate limit shared by replicas through Redis, and the bound on concurrent requests.

Real routers on loopback, real Redis, fake vLLM workers, raw sockets for the slow clients
and the official ``openai`` client for the real ones."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import openai
import pytest

from kvrouter.index.errors import ScriptArgumentError
from kvrouter.index.keys import KeySchema
from kvrouter.index.script_loader import load_scripts
from kvrouter.index.scripts import ResidencyIndex
from kvrouter.index.transport import ScriptCall
from router_node.app import GATE, METRICS, RouterServer
from tests.router.conftest import MODEL, StartRouter, openai_client, post, wait_for
from tests.support.clients import closed_after_test
from tests.support.fake_worker import FakeWorker
from tests.support.metrics import parse

pytestmark = pytest.mark.redis

PROMPT = list(range(40))


async def _dribblers(router: RouterServer, n: int) -> list[tuple[Any, Any]]:
    port = router.port
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        conns.append((reader, writer))
    return conns


async def _slowloris(router: RouterServer, seconds: float) -> tuple[list[float], list[float]]:
    """40 connections trickle a header line every 0.2 s for `seconds` while one real client
    sends requests. Returns when each slow connection was closed by the router (seconds after
    its first byte; none for those still open at the end) and the real requests' latencies."""
    start = time.monotonic()  # before the first byte: no drop can be measured as early
    conns = await _dribblers(router, 40)
    closed: dict[int, float] = {}

    async def watch(i: int, reader: Any) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()  # b"" (or a reset) when the router drops the connection
        closed[i] = time.monotonic() - start

    watchers = [asyncio.create_task(watch(i, r)) for i, (r, _) in enumerate(conns)]
    client = openai_client(router)
    latencies: list[float] = []
    try:
        while time.monotonic() - start < seconds:
            for i, (_, w) in enumerate(conns):
                if i not in closed:
                    with contextlib.suppress(ConnectionError):
                        w.write(b"X-a: b\r\n")
            t0 = time.monotonic()
            await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
            latencies.append(time.monotonic() - t0)
            await asyncio.sleep(0.2)
    finally:
        for t in watchers:
            t.cancel()
        for _, w in conns:
            w.close()
    return sorted(closed.values()), latencies


async def test_slow_header_clients_are_dropped_within_the_bound(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers, header_timeout_s=1.0)
    closed, latencies = await _slowloris(router, 3.0)
    # Every trickling connection is dropped, none before the bound and none long after it
    # (a fixed margin for a shared machine; without the timeout they stay open: next test).
    assert len(closed) == 40
    assert closed[0] >= 1.0 and closed[-1] < 2.5, closed  # header_timeout_s=1.0
    assert len(latencies) >= 5
    scrape = parse(router.app[METRICS].render())
    assert scrape.value("kvrouter_edge_refused_total", reason="header_timeout") == 40


async def test_without_the_timeout_trickling_clients_stay(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    """The control: header_timeout_s=0 leaves aiohttp's 75 s keep-alive as the only bound,
    so the same clients are all still connected after 3 s."""
    router = await start_router(workers, header_timeout_s=0)
    closed, latencies = await _slowloris(router, 3.0)
    assert closed == [] and latencies


async def test_a_slow_body_is_not_a_slow_header(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    """The deadline covers the headers only: a body that arrives slowly after complete
    headers is not cut by it."""
    router = await start_router(workers, header_timeout_s=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    body = b'{"model": "%s", "prompt": [1, 2, 3], "max_tokens": 2}' % MODEL.encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 4):
        writer.write(body[i : i + 4])
        await asyncio.sleep(0.1)  # 1.4 s in all, well past the header deadline
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 200"), status_line


async def test_header_count_and_size_limits(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers, max_headers=20, max_header_bytes=1024)
    url = router.url + "/v1/completions"
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    status, _, _ = await post(url, json=body, headers={f"x-h{i}": "v" for i in range(10)})
    assert status == 200
    status, _, _ = await post(url, json=body, headers={f"x-h{i}": "v" for i in range(40)})
    assert status == 400
    status, _, _ = await post(url, json=body, headers={"x-big": "v" * 2000})
    assert status == 400


async def test_rate_limit_is_shared_by_two_replicas(
    start_router: StartRouter, workers: list[FakeWorker], redis_client: Any
) -> None:
    """One client's burst of 4 is spent across two replicas (alternating); the 5th request
    gets 429 with Retry-After from whichever replica; another API key is not affected, and the
    bucket comes back after Retry-After."""
    a = await start_router(workers, rate_limit_rps=1.0, rate_limit_burst=4)
    b = await start_router(workers, rate_limit_rps=1.0, rate_limit_burst=4)

    def client(router: RouterServer, key: str) -> openai.AsyncOpenAI:
        url = router.url + "/v1"
        return closed_after_test(openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0))

    for i in range(4):
        await client((a, b)[i % 2], "key-one").completions.create(model=MODEL, prompt=PROMPT)
    with pytest.raises(openai.RateLimitError) as err:
        await client(a, "key-one").completions.create(model=MODEL, prompt=PROMPT)
    assert err.value.status_code == 429
    assert err.value.response.headers["Retry-After"] == "1"
    assert err.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        await client(b, "key-one").completions.create(model=MODEL, prompt=PROMPT)
    await client(b, "key-two").completions.create(model=MODEL, prompt=PROMPT)
    # The buckets are keyed by a digest: the API key itself is never written to Redis.
    keys = await redis_client.keys("kvr:rl:*")
    assert len(keys) == 2 and not any("key-" in k for k in keys), keys
    await asyncio.sleep(1.1)
    await client(a, "key-one").completions.create(model=MODEL, prompt=PROMPT)
    refused = sum(
        parse(r.app[METRICS].render()).value("kvrouter_edge_refused_total", reason="rate_limited")
        for r in (a, b)
    )
    assert refused == 2


async def test_rate_limit_off_by_default_and_without_redis(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    """Off by default; with no shared index it is not enforced (no replica counts alone)."""
    plain = await start_router(workers)
    no_redis = await start_router(workers, redis_url="", rate_limit_rps=1.0, rate_limit_burst=1)
    for router in (plain, no_redis):
        for _ in range(5):
            await openai_client(router).completions.create(model=MODEL, prompt=PROMPT)


async def test_concurrency_bound_answers_503(start_router: StartRouter, tokenizer: Any) -> None:
    slow = FakeWorker(model=MODEL, tokenizer=tokenizer, response_delay=1.0)
    await slow.start()
    try:
        router = await start_router([slow], max_concurrent=2, retry_after_s=3)
        client = openai_client(router)
        held = [
            asyncio.create_task(client.completions.create(model=MODEL, prompt=PROMPT))
            for _ in range(2)
        ]

        async def two_in_flight() -> bool:
            return router.app[GATE].in_flight == 2

        await wait_for(two_in_flight)
        status, headers, body = await post(
            router.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT}
        )
        assert status == 503 and headers["Retry-After"] == "3"
        assert b'"overloaded"' in body
        # Operations endpoints are not inference: they answer while the replica is full.
        status, _, _ = await post(router.url + "/debug/route", json={})
        assert status != 503
        for t in held:
            await t
        assert router.app[GATE].in_flight == 0
        await client.completions.create(model=MODEL, prompt=PROMPT)
    finally:
        await slow.stop()


# -- take_token-1.lua against the server itself --------------------------------------------------
T0 = 1_900_000_000_000  # ms


async def test_take_token_script(any_client: Any) -> None:
    idx = ResidencyIndex(any_client)
    script = load_scripts()["take_token"]
    key = KeySchema().rate_bucket("kclient")

    async def take(now_ms: int, rate: str = "2", burst: int = 3) -> list[int]:
        return list(await idx.call(ScriptCall(script, [key], [rate, burst, now_ms])))

    assert [await take(T0) for _ in range(3)] == [[1, 0]] * 3
    assert await take(T0) == [0, 500]  # 2 tokens/s: one is back in 500 ms
    assert await take(T0 + 250) == [0, 250]
    assert await take(T0 + 500) == [1, 0]
    # A long pause refills to the burst, not beyond it.
    assert [(await take(T0 + 60_000))[0] for _ in range(4)] == [1, 1, 1, 0]
    # The key expires once it would be full again: an idle client leaves nothing behind.
    assert 0 < await any_client.pttl(key) <= 1500 + 1000
    for bad_rate in ("0", "-1", "x", "nan", "inf"):
        with pytest.raises(ScriptArgumentError) as err:
            await take(T0, rate=bad_rate)
        assert err.value.argument == "rate"
    with pytest.raises(ScriptArgumentError) as err:
        await take(T0, burst=0)
    assert err.value.argument == "burst"


async def test_take_token_after_script_flush(redis_client: Any) -> None:
    idx = ResidencyIndex(redis_client)
    await redis_client.script_flush()
    call = ScriptCall(load_scripts()["take_token"], [KeySchema().rate_bucket("a1")], ["1", 1, 0])
    assert list(await idx.call(call)) == [1, 0]
