"""Priority admission (router_node/admission.py): with a model's workers saturated,
interactive requests start ahead of batch ones, batch ones wait in the router, and the queue
is bounded. Real router and Redis, a slow fake vLLM worker, the official openai client."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from router_node.app import ADMISSION
from tests.router.conftest import MODEL, StartRouter, openai_client, post, wait_for
from tests.support.fake_worker import FakeWorker

pytestmark = pytest.mark.redis

PROMPT = list(range(40))
BATCH = {"x-kvrouter-priority": "batch"}


@pytest.fixture
async def slow(tokenizer: Any) -> Any:
    w = FakeWorker(model=MODEL, tokenizer=tokenizer, response_delay=0.4)
    await w.start()
    yield w
    await w.stop()


async def test_interactive_goes_ahead_of_queued_batch(
    start_router: StartRouter, slow: FakeWorker
) -> None:
    """One worker, 2 slots, batch may fill 1: six batch requests start one at a time, an
    interactive request sent after them all starts at once and ends first."""
    router = await start_router([slow], worker_max_inflight=2, batch_share=0.5)
    client = openai_client(router)
    done: list[str] = []

    async def send(name: str, headers: dict[str, str]) -> None:
        await client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=2, extra_headers=headers
        )
        done.append(name)

    batch = [asyncio.create_task(send(f"batch{i}", BATCH)) for i in range(6)]

    async def five_waiting() -> bool:
        return router.app[ADMISSION].waiting(MODEL) == 5

    await wait_for(five_waiting)
    await send("interactive", {})
    # It started while batch ones waited: only the one batch request in flight ended first.
    assert done.index("interactive") <= 1, done
    assert router.app[ADMISSION].waiting(MODEL) >= 3
    await asyncio.gather(*batch)
    assert len(done) == 7 and router.app[ADMISSION].waiting() == 0


async def test_queue_is_bounded_and_priority_checked(
    start_router: StartRouter, slow: FakeWorker
) -> None:
    router = await start_router(
        [slow], worker_max_inflight=1, batch_share=1.0, priority_queue_max=2, retry_after_s=2
    )
    client = openai_client(router)
    held = [
        asyncio.create_task(
            client.completions.create(model=MODEL, prompt=PROMPT, extra_headers=BATCH)
        )
        for _ in range(3)
    ]

    async def two_waiting() -> bool:
        return router.app[ADMISSION].waiting(MODEL) == 2

    await wait_for(two_waiting)
    status, headers, body = await post(
        router.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT}
    )
    assert status == 503 and headers["Retry-After"] == "2" and b"overloaded" in body
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(
            model=MODEL, prompt=PROMPT, extra_headers={"x-kvrouter-priority": "urgent"}
        )
    await asyncio.gather(*held)


async def test_a_client_that_leaves_the_queue_frees_its_place(
    start_router: StartRouter, slow: FakeWorker
) -> None:
    router = await start_router([slow], worker_max_inflight=1)
    client = openai_client(router)
    first = asyncio.create_task(client.completions.create(model=MODEL, prompt=PROMPT))
    admission = router.app[ADMISSION]

    async def one_in_use() -> bool:
        q = admission.models.get(MODEL)
        return q is not None and q.in_use == 1

    await wait_for(one_in_use)
    leaving = asyncio.create_task(client.completions.create(model=MODEL, prompt=PROMPT))

    async def one_waiting() -> bool:
        return admission.waiting(MODEL) == 1

    await wait_for(one_waiting)
    leaving.cancel()

    async def none_waiting() -> bool:
        return admission.waiting(MODEL) == 0

    await wait_for(none_waiting)
    await first
    await client.completions.create(model=MODEL, prompt=PROMPT)
    assert admission.models[MODEL].in_use == 0


async def test_an_api_key_marked_batch_is_batch_whatever_its_header(
    start_router: StartRouter, slow: FakeWorker
) -> None:
    import hashlib

    digest = hashlib.sha256(b"nightly-jobs-key").hexdigest()
    router = await start_router(
        [slow], worker_max_inflight=2, batch_share=0.5, batch_key_digests=(digest,)
    )
    admission = router.app[ADMISSION]
    async with openai.AsyncOpenAI(
        base_url=router.url + "/v1", api_key="nightly-jobs-key", max_retries=0
    ) as jobs:
        sent = asyncio.create_task(
            jobs.completions.create(
                model=MODEL, prompt=PROMPT, extra_headers={"x-kvrouter-priority": "interactive"}
            )
        )

        async def batch_in_flight() -> bool:
            q = admission.models.get(MODEL)
            return q is not None and q.batch_in_use == 1

        await wait_for(batch_in_flight)
        # Another key's request is interactive (the default), so it is not counted as batch.
        await openai_client(router).completions.create(model=MODEL, prompt=PROMPT)
        await sent
    assert admission.models[MODEL].batch_in_use == 0
