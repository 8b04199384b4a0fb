"""End to end: the official openai client -> router -> fake vLLM workers, over real Redis."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest

from kvrouter.redisproc import RedisServer
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

SYSTEM = "You are a meticulous assistant for a large logistics company. " * 40


def chat(user: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def by_id(workers: list[FakeWorker], wid: str) -> FakeWorker:
    return next(w for w in workers if w.id == wid)


async def test_chat_non_streaming_routes_back_to_the_cached_prefix(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers)
    client = openai_client(router)
    first = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=chat("Where is parcel 1?")
    )
    w1 = first.headers["x-kvrouter-worker"]
    await settle(router)
    assert w1 in {w.id for w in workers}
    assert first.headers["x-kvrouter-matched-tokens"] == "0"
    body = first.parse()
    assert body.choices[0].message.content == " tok" * 4
    assert body.usage is not None and body.usage.prompt_tokens > 500

    second = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=chat("Where is parcel 2?")
    )
    assert second.headers["x-kvrouter-worker"] == w1
    matched = int(second.headers["x-kvrouter-matched-tokens"])
    usage = second.parse().usage
    assert usage is not None and usage.prompt_tokens_details is not None
    # The router's idea of the match is the engine's: same tokens, same blocks.
    assert matched == usage.prompt_tokens_details.cached_tokens > 500


async def test_chat_streaming_passes_sse_through_untouched(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers[:1])
    client = openai_client(router)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=chat("stream please"),
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    usage = None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == " tok" * 4
    assert usage is not None and usage.completion_tokens == 4

    # Byte for byte: what the client got is what the worker sent.
    payload = {"model": MODEL, "messages": chat("raw bytes"), "stream": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(router.url + "/v1/chat/completions", json=payload) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["x-kvrouter-worker"] == workers[0].id
        received = await r.read()
    assert received == bytes(workers[0].requests[-1]["sent"])
    assert received.endswith(b"data: [DONE]\n\n")


async def test_completions_pre_tokenized_streaming_and_not(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers)
    client = openai_client(router)
    prompt = list(range(10, 1010))  # 1,000 token ids, pre-tokenized
    done = await client.completions.with_raw_response.create(model=MODEL, prompt=prompt)
    w = done.headers["x-kvrouter-worker"]
    await settle(router)
    assert done.parse().choices[0].text == " tok" * 4
    assert by_id(workers, w).requests[-1]["body"]["prompt"] == prompt  # body forwarded as sent

    stream = await client.completions.create(model=MODEL, prompt=[*prompt, 7, 8], stream=True)
    pieces = [c.choices[0].text async for c in stream if c.choices]
    assert "".join(pieces) == " tok" * 4
    # Same prefix -> same worker; the worker saw a cache hit of every full block but the last.
    assert by_id(workers, w).requests[-1]["cached_tokens"] == 992

    text = await client.completions.create(model=MODEL, prompt="Once upon a time " * 50)
    assert text.choices[0].text == " tok" * 4


async def test_two_replicas_share_the_index(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    a = await start_router(workers)
    b = await start_router(workers)
    first = await openai_client(a).chat.completions.with_raw_response.create(
        model=MODEL, messages=chat("replica A asks")
    )
    served = first.headers["x-kvrouter-worker"]
    await settle(a)
    second = await openai_client(b).chat.completions.with_raw_response.create(
        model=MODEL, messages=chat("replica B asks")
    )
    assert second.headers["x-kvrouter-worker"] == served
    assert int(second.headers["x-kvrouter-matched-tokens"]) > 500
    assert by_id(workers, served).requests[-1]["cached_tokens"] > 500


async def test_killing_redis_fails_no_request_and_routing_resumes(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    with RedisServer() as redis:
        router = await start_router(workers, redis_url=redis.url)
        client = openai_client(router)
        r = await client.chat.completions.with_raw_response.create(model=MODEL, messages=chat("0"))
        assert r.headers["x-kvrouter-worker"]

        redis.kill()
        statuses = []
        for i in range(12):  # streaming and not, while Redis is gone
            if i % 2:
                stream = await client.chat.completions.create(
                    model=MODEL, messages=chat(f"down {i}"), stream=True
                )
                text = "".join(
                    [c.choices[0].delta.content or "" async for c in stream if c.choices]
                )
                statuses.append(text == " tok" * 4)
            else:
                out = await client.chat.completions.create(model=MODEL, messages=chat(f"down {i}"))
                statuses.append(out.choices[0].message.content == " tok" * 4)
        assert all(statuses)
        status, ready = await get_json(router.url + "/ready")
        assert status == 200 and ready["status"] == "degraded" and ready["redis"] == "down"
        status, _, _ = await post(router.url + "/debug/route")
        assert status == 403  # the debug endpoint answers too, without Redis
        text = await _get_text(router.url + "/metrics")
        m = parse(text)
        assert m.value("kvrouter_routing_decisions_total", policy="kv", reason="redis_down") > 0
        assert m.value("kvrouter_redis_up") == 0

        redis.start()  # same port, empty

        async def redis_back() -> bool:
            _, body = await get_json(router.url + "/ready")
            return bool(body["redis"] == "up")

        await wait_for(redis_back)
        first = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=chat("after 1")
        )
        await settle(router)
        second = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=chat("after 2")
        )
        assert second.headers["x-kvrouter-worker"] == first.headers["x-kvrouter-worker"]
        assert int(second.headers["x-kvrouter-matched-tokens"]) > 500


async def _get_text(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.text()


@pytest.mark.parametrize("fault", ["reset", "503"])
async def test_failure_before_first_byte_retries_next_best(
    start_router: StartRouter, workers: list[FakeWorker], fault: str
) -> None:
    router = await start_router(workers)
    client = openai_client(router)
    prompt = list(range(500))
    first = await client.completions.with_raw_response.create(model=MODEL, prompt=prompt)
    cached = by_id(workers, first.headers["x-kvrouter-worker"])
    await settle(router)
    cached.faults.append(fault)  # the prefix pulls the next request here first
    second = await client.completions.with_raw_response.create(
        model=MODEL, prompt=prompt, stream=False
    )
    assert second.headers["x-kvrouter-worker"] != cached.id
    assert second.parse().choices[0].text == " tok" * 4
    assert cached.served() == 2  # it did receive the failed attempt
    text = await _get_text(router.url + "/metrics")
    m = parse(text)
    assert m.value("kvrouter_retries_total") == 1
    assert m.value("kvrouter_upstream_errors_total", worker=cached.id) == 1


async def test_failure_after_first_byte_ends_stream_with_error_event(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers[:1])
    workers[0].faults.append("midstream")
    stream = await openai_client(router).completions.create(
        model=MODEL, prompt=list(range(40)), stream=True, max_tokens=10
    )
    got: list[str] = []
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        async for chunk in stream:
            got.append(chunk.choices[0].text)
    assert got == [" tok", " tok"]  # what arrived before the failure was delivered


async def test_client_disconnect_cancels_upstream(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers[:1])
    w = workers[0]
    w.token_delay = 0.05
    payload = {"model": MODEL, "prompt": list(range(40)), "stream": True, "max_tokens": 200}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(router.url + "/v1/completions", json=payload)
        assert (await resp.content.readany()).startswith(b"data: ")
        resp.close()  # the client goes away mid-stream

    async def cancelled() -> bool:
        return w.cancelled == 1

    await wait_for(cancelled)

    # Non-streaming: the client times out while the worker is still "prefilling".
    w.response_delay = 30
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            await s.post(
                router.url + "/v1/completions",
                json={"model": MODEL, "prompt": list(range(40))},
                timeout=aiohttp.ClientTimeout(total=0.3),
            )

    async def cancelled_twice() -> bool:
        return w.cancelled == 2

    await wait_for(cancelled_twice)
    assert w.completed == 0


# -- bad input -----------------------------------------------------------------------------------
async def test_400_malformed_json_and_fields(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers)
    status, _, body = await post(
        router.url + "/v1/chat/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    client = openai_client(router)
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model=MODEL, messages=[])
    assert e.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        await client.completions.create(model=MODEL, prompt=[1, 2, 10**7])
    with pytest.raises(openai.BadRequestError, match="stream"):
        await client.completions.create(model=MODEL, prompt="x", extra_body={"stream": "yes"})
    assert all(w.served() == 0 for w in workers)


async def test_404_unknown_model(start_router: StartRouter, workers: list[FakeWorker]) -> None:
    router = await start_router(workers)
    with pytest.raises(openai.NotFoundError) as e:
        await openai_client(router).chat.completions.create(model="nope", messages=chat("x"))
    assert e.value.body["code"] == "model_not_found"  # type: ignore[index]
    status, _, body = await post(router.url + "/v1/no-such-endpoint", json={})
    assert status == 404 and "error" in json.loads(body)


async def test_413_body_and_prompt_limits(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers, max_body_bytes=4096, max_prompt_tokens=100)
    client = openai_client(router)
    with pytest.raises(openai.APIStatusError) as e:
        await client.completions.create(model=MODEL, prompt="x" * 5000)
    assert e.value.status_code == 413
    with pytest.raises(openai.APIStatusError) as e:
        await client.completions.create(model=MODEL, prompt=list(range(101)))
    assert e.value.status_code == 413 and "101 tokens" in e.value.message
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model=MODEL, messages=chat("x"))  # ~600 tokens
    assert e.value.status_code == 413
    ok = await client.completions.create(model=MODEL, prompt=list(range(100)))
    assert ok.choices


async def test_503_with_retry_after_when_no_worker_is_healthy(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers[:2], health_interval_s=0.05)
    for w in workers[:2]:
        w.healthy = False

    async def unready() -> bool:
        status, _ = await get_json(router.url + "/ready")
        return status == 503

    await wait_for(unready)
    status, headers, body = await post(
        router.url + "/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3]}
    )
    assert status == 503 and headers["Retry-After"] == "1"
    assert json.loads(body)["error"]["code"] == "no_worker"
    with pytest.raises(openai.InternalServerError):
        await openai_client(router).completions.create(model=MODEL, prompt=[1, 2, 3])


async def test_all_attempts_failing_is_a_503(
    start_router: StartRouter, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers[:2])
    for w in workers[:2]:
        w.faults.append("reset")
    status, headers, body = await post(
        router.url + "/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3]}
    )
    assert status == 503 and "Retry-After" in headers
    assert "2 tried" in json.loads(body)["error"]["message"]


async def test_large_bodies_tokenize_in_a_thread(
    start_router: StartRouter, workers: list[FakeWorker], tokenizer: Any
) -> None:
    router = await start_router(workers[:1], tokenize_thread_bytes=0)  # every body
    out = await openai_client(router).chat.completions.with_raw_response.create(
        model=MODEL, messages=chat("threaded")
    )
    usage = out.parse().usage
    assert usage is not None and usage.prompt_tokens == len(tokenizer.encode_chat(chat("threaded")))


@pytest.mark.cluster
async def test_routing_on_a_redis_cluster(
    start_router: StartRouter,
    workers: list[FakeWorker],
    redis_cluster_url: str,
    cluster_client: Any,
) -> None:
    router = await start_router(workers, redis_url=redis_cluster_url)
    client = openai_client(router)
    first = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=chat("cluster 1")
    )
    await settle(router)
    second = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=chat("cluster 2")
    )
    assert second.headers["x-kvrouter-worker"] == first.headers["x-kvrouter-worker"]
    assert int(second.headers["x-kvrouter-matched-tokens"]) > 500
    _, ready = await get_json(router.url + "/ready")
    assert ready["redis"] == "up"
