"""Prefill/decode disaggregation end to end, all real processes: Redis, `kvrouter sim` with
two prefill and two decode workers, `kvrouter listen` on their KV events, two `kvrouter
serve` replicas, and the official openai client.

What each worker received is read back from the simulator's ``/admin/state`` (its P/D
counters and the last prefill and decode legs it saw).
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from kvrouter.bench.stack import LocalStack, StackConfig
from kvrouter.tokenizer.testing import build_test_tokenizer
from tests.support.clients import closed_after_test

pytestmark = pytest.mark.redis

MODEL = "llama-3-8b"
ADMIN = "pd-admin"
PREFILL = ("sim-0", "sim-1")
DECODE = ("sim-2", "sim-3")
SYSTEM = "You are a meticulous assistant for a large logistics company. " * 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tok = build_test_tokenizer(tmp_path_factory.mktemp("pd-tok"), "llama3")
    config = StackConfig(
        workers=4,
        prefill_workers=2,
        replicas=2,
        model=MODEL,
        extra_router_env=(
            ("KVR_TOKENIZER", str(tok)),
            ("KVR_ADMIN_TOKEN", ADMIN),
            ("KVR_PD_MIN_PREFILL_TOKENS", "256"),
            # One injected failure must not eject a worker for the rest of the module.
            ("KVR_EJECT_FAILURES", "10"),
            # No active health checks: the restart test expects the next request to try the
            # restarted worker first and count a retry; a check landing in its 0.2 s window
            # (one in 25 with the default 5 s period) marks the worker down first, and the
            # router then skips it without a retry, correctly but not the path under test.
            ("KVR_HEALTH_INTERVAL_S", "0"),
        ),
    )
    s = LocalStack(config, workdir=Path(tmp_path_factory.mktemp("pd-stack")))
    asyncio.run(s.start())
    try:
        yield s
    finally:
        s.close()


def url_of(stack: LocalStack, wid: str) -> str:
    assert stack.fleet is not None
    return next(w.url for w in stack.fleet.workers if w.id == wid)


async def state(stack: LocalStack, wid: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url_of(stack, wid) + "/admin/state") as r:
        body: dict[str, Any] = await r.json()
        return body


async def pd_counts(stack: LocalStack, key: str, wids: tuple[str, ...]) -> int:
    return sum([(await state(stack, w))["pd"][key] for w in wids])


async def fault(stack: LocalStack, wid: str, mode: str, count: int = 1) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(stack, wid) + f"/admin/pd_fault?mode={mode}&count={count}") as r,
    ):
        assert r.status == 200


def client(stack: LocalStack, replica: int = 0) -> AsyncOpenAI:
    url = stack.router_urls[replica] + "/v1"
    return closed_after_test(AsyncOpenAI(base_url=url, api_key="k", max_retries=0))


async def metric(stack: LocalStack, name: str, replica: int = 0) -> float:
    text = await stack.metrics(stack.router_urls[replica])
    pattern = re.escape(name) + r" ([0-9.e+-]+)"
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


async def debug_route(stack: LocalStack, body: dict[str, Any], replica: int = 0) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            stack.router_urls[replica] + "/debug/route",
            json=body,
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as r,
    ):
        assert r.status == 200, await r.text()
        return await r.json()


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 4000) for _ in range(n)]  # the test tokenizer's vocabulary


async def settle_events() -> None:
    # Dispatch records and leases land a round trip after the answer; KV events a little
    # later through the listener.
    await asyncio.sleep(0.5)


def assert_prefill_leg(st: dict[str, Any], rid: str | None = None) -> dict[str, Any]:
    leg = st["pd"]["last_prefill"]
    assert leg["max_tokens"] == 1 and leg["stream"] is False
    params = leg["kv_transfer_params"]
    assert params["do_remote_decode"] is True and params["do_remote_prefill"] is False
    if rid is not None:
        assert leg["request_id"] == rid
    return dict(leg)


async def test_ready_and_metrics_show_the_pools(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as s, s.get(stack.router_urls[0] + "/ready") as r:
        body = await r.json()
    assert sorted(body["pools"]["prefill"]) == list(PREFILL)
    assert sorted(body["pools"]["decode"]) == list(DECODE)
    assert body["pools"]["both"] == []
    assert await metric(stack, 'kvrouter_pool_workers{role="prefill"}') == 2
    assert await metric(stack, 'kvrouter_pool_workers{role="decode"}') == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_runs_prefill_then_decode_with_the_returned_params(
    stack: LocalStack, stream: bool
) -> None:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Where is parcel {stream}?"},
    ]
    legs_before = await pd_counts(stack, "prefill_legs", PREFILL)
    c = client(stack)
    if stream:
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in raw.parse():
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert usage is not None and usage.completion_tokens == 7
        assert text
    else:
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=7,
        )
        body = raw.parse()
        assert body.usage is not None and body.usage.completion_tokens == 7
        assert body.choices[0].finish_reason == "length"
    pw, dw = raw.headers["x-kvrouter-prefill-worker"], raw.headers["x-kvrouter-worker"]
    assert pw in PREFILL and dw in DECODE
    assert await pd_counts(stack, "prefill_legs", PREFILL) == legs_before + 1
    p_state, d_state = await state(stack, pw), await state(stack, dw)
    leg = assert_prefill_leg(p_state)
    # The decode worker got the prefill worker's params and the client's own limits.
    dec = d_state["pd"]["last_decode"]
    params = dec["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["remote_engine_id"] == pw
    assert params["remote_block_ids"] and params["remote_request_id"]
    assert dec["max_tokens"] == 7 and dec["stream"] is stream
    assert dec["request_id"] == leg["request_id"]  # one X-Request-Id for both legs
    assert d_state["pd"]["pulled_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True])
async def test_completions_split_streaming_and_not(stack: LocalStack, stream: bool) -> None:
    prompt = tokens(100 + stream, 1500)
    c = client(stack)
    if stream:
        raw = await c.completions.with_raw_response.create(
            model=MODEL, prompt=prompt, max_tokens=5, stream=True
        )
        pieces = [ch.choices[0].text async for ch in raw.parse() if ch.choices]
        assert len(pieces) >= 1
    else:
        raw = await c.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=5)
        body = raw.parse()
        assert body.usage is not None and body.usage.completion_tokens == 5
    pw, dw = raw.headers["x-kvrouter-prefill-worker"], raw.headers["x-kvrouter-worker"]
    assert pw in PREFILL and dw in DECODE
    assert_prefill_leg(await state(stack, pw))
    dec = (await state(stack, dw))["pd"]["last_decode"]
    assert dec["kv_transfer_params"]["remote_engine_id"] == pw and dec["stream"] is stream


async def test_short_and_cached_prompts_skip_the_prefill_hop(stack: LocalStack) -> None:
    c = client(stack)
    legs = await pd_counts(stack, "prefill_legs", PREFILL)
    short = await c.completions.with_raw_response.create(
        model=MODEL, prompt=tokens(7, 100), max_tokens=3
    )
    assert "x-kvrouter-prefill-worker" not in short.headers
    assert short.headers["x-kvrouter-worker"] in DECODE
    assert short.parse().usage.completion_tokens == 3  # type: ignore[union-attr]

    prompt = tokens(8, 2000)
    first = await c.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=3)
    dw = first.headers["x-kvrouter-worker"]
    assert first.headers["x-kvrouter-prefill-worker"] in PREFILL
    await settle_events()
    # The decode worker now holds the prompt (its pulled blocks): a follow-up turn's suffix
    # is short, so it runs whole there, no prefill hop.
    follow = [*prompt, *tokens(9, 40)]
    route = await debug_route(stack, {"model": MODEL, "prompt": follow})
    assert route["pd"]["split"] is False and route["pd"]["reason"] == "short_suffix"
    again = await c.completions.with_raw_response.create(model=MODEL, prompt=follow, max_tokens=3)
    assert "x-kvrouter-prefill-worker" not in again.headers
    assert again.headers["x-kvrouter-worker"] == dw
    usage = again.parse().usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens >= 1984  # the pulled blocks hit locally
    assert await pd_counts(stack, "prefill_legs", PREFILL) == legs + 1
    assert await metric(stack, 'kvrouter_pd_decisions_total{reason="short_suffix"}') >= 2


async def test_a_failed_prefill_worker_falls_through(stack: LocalStack) -> None:
    c = client(stack)
    # Put a prompt on one prefill worker, then extend it by a long new part: that worker is
    # the first prefill candidate (it holds the prefix) and the suffix is long enough to split.
    base = tokens(20, 1200)
    first = await c.completions.with_raw_response.create(model=MODEL, prompt=base, max_tokens=2)
    holder = first.headers["x-kvrouter-prefill-worker"]
    other = next(w for w in PREFILL if w != holder)
    await settle_events()
    longer = [*base, *tokens(21, 1200)]
    route = await debug_route(stack, {"model": MODEL, "prompt": longer})
    assert route["pd"]["split"] and route["pd"]["prefill"] == holder
    await fault(stack, holder, "fail")
    nxt = await c.completions.with_raw_response.create(model=MODEL, prompt=longer, max_tokens=2)
    assert nxt.headers["x-kvrouter-prefill-worker"] == other
    assert nxt.parse().usage.completion_tokens == 2  # type: ignore[union-attr]

    # Every prefill worker failing: the decode worker runs the request whole.
    fallbacks = await metric(stack, 'kvrouter_pd_fallbacks_total{cause="prefill_failed"}')
    for w in PREFILL:
        await fault(stack, w, "fail")
    whole = await c.completions.with_raw_response.create(
        model=MODEL, prompt=tokens(22, 1500), max_tokens=4
    )
    assert "x-kvrouter-prefill-worker" not in whole.headers
    assert whole.headers["x-kvrouter-worker"] in DECODE
    assert whole.parse().usage.completion_tokens == 4  # type: ignore[union-attr]
    assert await metric(stack, 'kvrouter_pd_fallbacks_total{cause="prefill_failed"}') == (
        fallbacks + 1
    )


async def test_a_failed_decode_worker_passes_the_same_params_to_the_next(
    stack: LocalStack,
) -> None:
    c = client(stack)
    # A decode worker holding a prompt ranks first for its long continuation (less to pull).
    base = tokens(70, 1200)
    first = await c.completions.with_raw_response.create(model=MODEL, prompt=base, max_tokens=2)
    holder = first.headers["x-kvrouter-worker"]
    other = next(w for w in DECODE if w != holder)
    await settle_events()
    longer = [*base, *tokens(71, 1200)]
    route = await debug_route(stack, {"model": MODEL, "prompt": longer})
    assert route["pd"]["split"] and route["pd"]["decode"] == holder
    retries = await metric(stack, "kvrouter_retries_total")
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(stack, holder) + "/admin/restart?down_s=2") as r,
    ):
        assert r.status == 200
    await asyncio.sleep(0.2)
    nxt = await c.completions.with_raw_response.create(model=MODEL, prompt=longer, max_tokens=3)
    assert nxt.headers["x-kvrouter-worker"] == other
    assert nxt.parse().usage.completion_tokens == 3  # type: ignore[union-attr]
    pw = nxt.headers["x-kvrouter-prefill-worker"]
    dec = (await state(stack, other))["pd"]["last_decode"]
    assert dec["kv_transfer_params"]["remote_engine_id"] == pw
    assert dec["request_id"] == (await state(stack, pw))["pd"]["last_prefill"]["request_id"]
    assert await metric(stack, "kvrouter_retries_total") >= retries + 1
    await asyncio.sleep(2.0)  # the worker is back for the tests that follow


@pytest.mark.parametrize(
    ("mode", "cause"), [("omit", "missing_params"), ("malformed", "malformed_params")]
)
async def test_a_prefill_answer_without_usable_params_runs_whole_on_decode(
    stack: LocalStack, mode: str, cause: str
) -> None:
    before = await metric(stack, f'kvrouter_pd_fallbacks_total{{cause="{cause}"}}')
    decodes = await pd_counts(stack, "remote_decodes", DECODE)
    invalid = await pd_counts(stack, "invalid_params", DECODE)
    for w in PREFILL:
        await fault(stack, w, mode, count=2)  # either may take both requests
    seed = 30 if mode == "omit" else 40
    for stream in (False, True):
        c = client(stack)
        if stream:
            raw = await c.completions.with_raw_response.create(
                model=MODEL, prompt=tokens(seed, 1500), max_tokens=4, stream=True
            )
            text = "".join([ch.choices[0].text async for ch in raw.parse() if ch.choices])
            assert text
        else:
            raw = await c.completions.with_raw_response.create(
                model=MODEL, prompt=tokens(seed + 1, 1500), max_tokens=4
            )
            assert raw.parse().usage.completion_tokens == 4  # type: ignore[union-attr]
        assert raw.headers["x-kvrouter-worker"] in DECODE
        assert "x-kvrouter-prefill-worker" not in raw.headers
    for w in PREFILL:
        await fault(stack, w, "")  # clear what is left
    assert await metric(stack, f'kvrouter_pd_fallbacks_total{{cause="{cause}"}}') == before + 2
    # Nothing was forwarded as transfer params: no decode leg, no invalid params on a worker.
    assert await pd_counts(stack, "remote_decodes", DECODE) == decodes
    assert await pd_counts(stack, "invalid_params", DECODE) == invalid


async def test_a_client_disconnect_cancels_the_prefill_request(stack: LocalStack) -> None:
    aborted = await pd_counts(stack, "prefill_aborted", PREFILL)
    legs = await pd_counts(stack, "prefill_legs", PREFILL)
    # 40k uncached tokens take the prefill worker about 2.5 s (16k tokens/s): leave at 0.6 s.
    body = {"model": MODEL, "prompt": tokens(60, 40_000), "max_tokens": 50}
    with pytest.raises(TimeoutError):
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                stack.router_urls[0] + "/v1/completions",
                json=body,
                timeout=aiohttp.ClientTimeout(total=0.6),
            ) as r,
        ):
            await r.read()

    async def cancelled() -> bool:
        return await pd_counts(stack, "prefill_aborted", PREFILL) == aborted + 1

    deadline = asyncio.get_running_loop().time() + 5
    while not await cancelled():
        assert asyncio.get_running_loop().time() < deadline, "the prefill leg ran on"
        await asyncio.sleep(0.05)
    assert await pd_counts(stack, "prefill_legs", PREFILL) == legs + 1
    assert await metric(stack, "kvrouter_pd_prefill_cancelled_total") >= 1
    # The prefill worker's engine let go of it: nothing of it left running or waiting.
    for w in PREFILL:
        st = await state(stack, w)
        assert st["running"] == 0 and st["waiting"] == 0


async def test_two_replicas_share_the_prefill_pools_residency_and_load(
    stack: LocalStack,
) -> None:
    # Residency: a prompt prefilled through replica 0 ranks its prefill worker first on
    # replica 1 (the shared index), with the prompt's blocks matched.
    base = tokens(50, 1600)
    first = await client(stack, 0).completions.with_raw_response.create(
        model=MODEL, prompt=base, max_tokens=2
    )
    holder = first.headers["x-kvrouter-prefill-worker"]
    await settle_events()
    longer = [*base, *tokens(51, 1600)]
    route = await debug_route(stack, {"model": MODEL, "prompt": longer}, replica=1)
    assert route["pd"]["prefill"] == holder
    matched = {w["worker"]: w["matched_blocks"] for w in route["workers"]}
    assert matched[holder] >= 1600 // 16 - 1

    # Load: while replica 0 has a long prefill in flight on a prefill worker, replica 1 sees
    # its queued prefill tokens (the shared lease) and ranks the other prefill worker first.
    slow = {"model": MODEL, "prompt": tokens(52, 40_000), "max_tokens": 2}

    async def send() -> str:
        async with (
            aiohttp.ClientSession() as s,
            s.post(stack.router_urls[0] + "/v1/completions", json=slow) as r,
        ):
            await r.read()
            return r.headers["x-kvrouter-prefill-worker"]

    task = asyncio.create_task(send())
    busy: str | None = None
    fresh = {"model": MODEL, "prompt": tokens(53, 1500)}
    deadline = asyncio.get_running_loop().time() + 5
    while busy is None:
        assert asyncio.get_running_loop().time() < deadline, "replica 1 never saw the load"
        route = await debug_route(stack, fresh, replica=1)
        loads = {w["worker"]: w["load"]["prefill_tokens"] for w in route["workers"]}
        busy = next((w for w in PREFILL if loads[w] >= 39_000), None)
        await asyncio.sleep(0.05)
    idle = next(w for w in PREFILL if w != busy)
    assert route["pd"]["prefill"] == idle
    assert await task == busy
