"""Feedback that heals (issue #17 item 2), end to end: `kvrouter sim` as a process, a router
over real Redis, the official openai client.

A worker holds a prompt and a sibling that shares its first blocks; the simulator then drops
its cache silently (`/admin/restart`: no events, as a crashed and restarted engine). The next
request for the prompt goes to that worker (the index still claims the blocks) and the engine
reports 0 cached tokens. With feedback on, that one response corrects the index: neither the
prompt nor its sibling matches the worker any more. With feedback off both still match (until
the records' TTL). The prediction error histogram sees the shortfall either way.

Loopback only; every wait is bounded; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest

from kvrouter.index.hashing import BlockHasher
from kvrouter.index.scripts import ResidencyIndex
from kvrouter.redisproc import free_port
from router_node.feedback import Feedback, common_prefix, connection_refused
from router_node.metrics import Metrics
from router_node.routing import Plan
from router_node.scoring import Decision
from router_node.settings import RouterSettings
from router_node.shared_index import SharedIndex
from router_node.workers import Worker
from tests.router.conftest import settle, wait_for
from tests.support.metrics import parse
from tests.support.simproc import fresh_router, sim_process

pytestmark = pytest.mark.redis
MODEL = "sim-model"
ADAPTER = "sim-adapter"  # its own records on the same workers (as a LoRA adapter's)
B = 16
PROMPT = [(37 * i + 11) % 20_000 for i in range(B * 10 + 3)]
# Shares PROMPT's first 6 blocks, then goes its own way.
SIBLING = PROMPT[: B * 6] + [(91 * i + 5) % 20_000 for i in range(B * 4 + 3)]
USEFUL = (len(PROMPT) - 1) // B  # blocks an engine can reuse: 10


@pytest.fixture(scope="module")
def sim_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two simulated workers in a `kvrouter sim` child process, KV events off."""
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
        "--time-scale",
        "200",
    ) as fleet:
        yield fleet


async def _complete(client: openai.AsyncOpenAI, prompt: list[int], stream: bool) -> int:
    """Send `prompt`; return the cached tokens the engine reported."""
    if not stream:
        done = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        assert done.usage is not None and done.usage.prompt_tokens_details is not None
        return done.usage.prompt_tokens_details.cached_tokens or 0
    cached: int | None = None
    chunks = await client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in chunks:
        if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    assert cached is not None, "the final usage chunk carries cached tokens"
    return cached


@pytest.mark.parametrize(
    ("heal", "stream"),
    [(True, False), (True, True), (False, False)],
    ids=["on", "on-stream", "off"],
)
async def test_a_silent_restart_is_corrected_by_one_response(
    sim_fleet: dict[str, Any], redis_url: str, redis_client: Any, heal: bool, stream: bool
) -> None:
    workers = sim_fleet["workers"]
    router = await fresh_router(workers, redis_url=redis_url, models=(MODEL,), feedback_heal=heal)
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="k", max_retries=0)
    idx = ResidencyIndex(redis_client)
    prompt_keys = BlockHasher(MODEL, B).keys(PROMPT)
    sibling_keys = BlockHasher(MODEL, B).keys(SIBLING)
    try:
        assert await _complete(client, PROMPT, stream) == 0
        await settle(router)
        (held,) = (await idx.lookup(MODEL, prompt_keys)).depths
        # The sibling follows its shared prefix to the same worker, which had those blocks.
        assert await _complete(client, SIBLING, stream) == 6 * B
        await settle(router)
        assert (await idx.lookup(MODEL, sibling_keys)).depths == {held: len(sibling_keys)}

        url = next(w["url"] for w in workers if w["id"] == held)
        async with aiohttp.ClientSession() as http, http.post(url + "/admin/restart") as r:
            assert r.status == 200  # the cache is gone, and no event says so

        # Routed to the same worker (the index claims the prompt there); the engine had none.
        assert await _complete(client, PROMPT, stream) == 0
        await settle(router)
        async with aiohttp.ClientSession() as http, http.get(router.url + "/metrics") as r:
            m = parse(await r.text())
        # Errors seen: 0 (cold), 0 (sibling), -160 (the lost prompt).
        assert m.value("kvrouter_prediction_error_tokens_count", model=MODEL) == 3
        over = {"model": MODEL, "direction": "over"}
        assert m.value("kvrouter_mispredicted_tokens_total", **over) == USEFUL * B
        assert not m.has("kvrouter_mispredicted_tokens_total", direction="under")
        assert m.value("kvrouter_prediction_error_tokens_bucket", model=MODEL, le="-1.0") == 1
        prompt_depths = (await idx.lookup(MODEL, prompt_keys)).depths
        sibling_depths = (await idx.lookup(MODEL, sibling_keys)).depths
        if heal:
            assert m.value("kvrouter_index_corrections_total", model=MODEL) == 1
            # The chain's records, and the sibling's own blocks: the engine lost block 0
            # after the sibling completed through it (a witness), so it lost the sibling's
            # tail too (the shared blocks were used again since, by this request).
            own = len(sibling_keys) - 6
            assert m.value("kvrouter_index_corrected_blocks_total", model=MODEL) == USEFUL + own
            assert held not in prompt_depths
            assert held not in sibling_depths  # the whole lost subtree, not just this chain
        else:
            assert not m.has("kvrouter_index_corrections_total", model=MODEL)
            assert prompt_depths == {held: len(prompt_keys)}
            assert sibling_depths == {held: len(sibling_keys)}
    finally:
        await client.close()
        await router.close()


async def test_rounding_alone_never_corrects(
    sim_fleet: dict[str, Any], redis_url: str, redis_client: Any
) -> None:
    """A prompt whose every token is cached: the engine reports whole blocks short of the
    prompt's length, the router matched the same whole blocks; no correction, error 0."""
    workers = sim_fleet["workers"][:1]
    router = await fresh_router(workers, redis_url=redis_url, models=(MODEL,))
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="k", max_retries=0)
    exact = PROMPT[: B * 8]  # a whole number of blocks: the engine reuses 7 of them
    try:
        for _ in range(3):
            await _complete(client, exact, False)
            await settle(router)

        async def observed() -> bool:
            async with aiohttp.ClientSession() as http, http.get(router.url + "/metrics") as r:
                m = parse(await r.text())
            return m.value("kvrouter_prediction_error_tokens_count", model=MODEL) == 3

        await wait_for(observed)
        async with aiohttp.ClientSession() as http, http.get(router.url + "/metrics") as r:
            m = parse(await r.text())
        assert m.value("kvrouter_prediction_error_tokens_bucket", model=MODEL, le="-1.0") == 0
        assert m.value("kvrouter_prediction_error_tokens_bucket", model=MODEL, le="0.0") == 3
        assert not m.has("kvrouter_mispredicted_tokens_total", model=MODEL)
        assert not m.has("kvrouter_index_corrections_total", model=MODEL)
        keys = BlockHasher(MODEL, B).keys(exact)
        assert (await ResidencyIndex(redis_client).lookup(MODEL, keys)).depths == {
            workers[0]["id"]: len(keys)
        }
    finally:
        await client.close()
        await router.close()


def test_common_prefix_of_chained_keys() -> None:
    a = BlockHasher(MODEL, B).keys(PROMPT)
    b = BlockHasher(MODEL, B).keys(SIBLING)
    assert common_prefix(a, b) == common_prefix(b, a) == 6
    assert common_prefix(a, a) == len(a)
    assert common_prefix(a, a[:3]) == 3
    assert common_prefix(a, []) == 0
    assert common_prefix(a, BlockHasher("other", B).keys(PROMPT)) == 0


@dataclass
class Rig:
    """A Feedback on a real SharedIndex, its corrections collected as tasks to await, and
    that SharedIndex's own ResidencyIndex for the tests' records: a router writes its
    records and cuts them on one estimate of the Redis server's clock, so the tests' short
    sleeps order them exactly. (A second ResidencyIndex has its own estimate, which a stalled
    first TIME sample can put tens of ms off; that bound has its own tests in test_clock.py.)"""

    feedback: Feedback
    metrics: Metrics
    spawned: list[asyncio.Task[Any]]
    index: ResidencyIndex


@pytest.fixture
async def rig(redis_url: str, redis_client: Any) -> AsyncIterator[Rig]:
    """On a flushed server (`redis_client`)."""
    settings = RouterSettings(redis_url=redis_url, models=(MODEL,), workers=())
    metrics = Metrics()
    shared = SharedIndex(settings, metrics)
    await shared.start()
    spawned: list[asyncio.Task[Any]] = []

    def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        spawned.append(task)
        return task

    assert shared.index is not None
    yield Rig(Feedback(settings, shared, metrics, spawn), metrics, spawned, shared.index)
    await shared.close()


async def test_a_shortfall_racing_an_earlier_request_corrects_nothing(rig: Rig) -> None:
    """Two requests for the same chain on one worker: the second matched what the first
    recorded at dispatch and the engine had not computed yet. Its shortfall is a race: no
    correction. The same shortfall once the first request is done is a loss: corrected."""
    feedback, metrics, spawned = rig.feedback, rig.metrics, rig.spawned
    keys = BlockHasher(MODEL, B).keys(PROMPT)
    idx = rig.index
    await idx.record(MODEL, "w", keys, ttl_new_ms=600_000)

    def plan() -> Plan:
        decision = Decision(policy="kv", reason="prefix", ranking=("w",))
        return Plan(decision, keys, USEFUL, depths={"w": len(keys)}, indexed=True, block_size=B)

    first, second = plan(), plan()
    assert feedback.dispatched(MODEL, "w", first) == 0
    racing = feedback.dispatched(MODEL, "w", second)
    assert racing == len(keys)
    feedback.observe(MODEL, "w", second, 0, racing)
    assert not spawned
    feedback.finished(MODEL, "w", second)
    feedback.finished(MODEL, "w", first)
    await asyncio.sleep(0.05)
    third = plan()
    assert feedback.dispatched(MODEL, "w", third) == 0
    await idx.record(MODEL, "w", keys, ttl_new_ms=600_000)  # the dispatch's record
    feedback.observe(MODEL, "w", third, 2 * B, 0)
    await asyncio.gather(*spawned)
    feedback.finished(MODEL, "w", third)
    assert (await idx.lookup(MODEL, keys)).depths == {"w": 2}
    sample = metrics.registry.get_sample_value("kvrouter_index_corrections_total", {"model": MODEL})
    assert sample == 1


async def test_a_witness_cuts_what_an_lru_engine_lost_with_the_block(rig: Rig) -> None:
    """On worker w, P1 completed through block 0, so its engine held it; when P2 then gets
    none of it, the engine evicted block 0 since, and with it every block last used before
    P1 was sent: `old` goes, `new` (used after P1 was sent) stays. On worker v the request
    that completed through block 0 did so after Q1 was sent: no witness for Q1, no cut."""
    feedback, metrics, spawned = rig.feedback, rig.metrics, rig.spawned
    hasher = BlockHasher(MODEL, B)
    keys = hasher.keys(PROMPT)
    old, new = hasher.keys(SIBLING[::-1]), hasher.keys(PROMPT[::-1])
    idx = rig.index

    def plan(depth: int) -> Plan:
        decision = Decision(policy="kv", reason="prefix", ranking=("w", "v"))
        depths = {"w": depth, "v": depth} if depth else {}
        return Plan(decision, keys, USEFUL, depths=depths, indexed=True, block_size=B)

    async def send(worker: str, p: Plan) -> None:
        feedback.dispatched(MODEL, worker, p)
        await idx.record(MODEL, worker, keys, ttl_new_ms=600_000)
        await asyncio.sleep(0.05)  # later than the record, on the one clock

    def cut() -> float | None:
        return metrics.registry.get_sample_value(
            "kvrouter_index_lru_cut_blocks_total", {"model": MODEL}
        )

    for w in ("w", "v"):
        await idx.record(MODEL, w, old, ttl_new_ms=600_000)
    await asyncio.sleep(0.05)
    p1 = plan(0)
    await send("w", p1)
    feedback.observe(MODEL, "w", p1, 0)  # a cold prompt, computed: a witness
    feedback.finished(MODEL, "w", p1)
    await idx.record(MODEL, "w", new, ttl_new_ms=600_000)
    p2 = plan(len(keys))
    await send("w", p2)
    feedback.observe(MODEL, "w", p2, 0)
    feedback.finished(MODEL, "w", p2)
    await asyncio.gather(*spawned)
    assert (await idx.lookup(MODEL, old)).depths == {"v": len(old)}
    assert (await idx.lookup(MODEL, new)).depths == {"w": len(new)}
    assert (await idx.lookup(MODEL, keys)).depths == {}  # the chain's own correction
    assert cut() == len(old)

    q1, q2 = plan(len(keys)), plan(0)
    await send("v", q1)
    await send("v", q2)
    feedback.observe(MODEL, "v", q2, 0)  # completes after q1 was sent
    feedback.observe(MODEL, "v", q1, 0)
    await asyncio.gather(*spawned)
    assert (await idx.lookup(MODEL, old)).depths == {"v": len(old)}
    assert cut() == len(old)
    # With the cut off, the witness is ignored: the chain only.
    feedback.settings = feedback.settings.model_copy(update={"feedback_lru_cut": False})
    p3 = plan(len(keys))
    await send("v", p3)
    feedback.observe(MODEL, "v", p3, 0)
    await asyncio.gather(*spawned)
    assert (await idx.lookup(MODEL, old)).depths == {"v": len(old)}
    assert cut() == len(old)


@pytest.mark.parametrize(
    ("capacity", "emptied"),
    [(1000, True), (200, False), (40, False), (0, False)],
    ids=["small", "several-models", "full", "unknown"],
)
async def test_a_loss_too_small_for_an_eviction_empties_the_worker(
    rig: Rig, capacity: int, emptied: bool
) -> None:
    """P1 completed through block 0 on w (a witness), then `new` and an adapter's 40 blocks
    were used there, then P2 finds block 0 gone. An LRU engine evicts block 0 only once blocks
    used after P1 fill its cache: with 1,000 blocks of capacity the 65 used since (25 of the
    model, 40 of the adapter) cannot, so the cache was emptied (a silent restart) and `new` and
    the adapter's blocks are stale too; every record used before P2 was sent goes, `later`
    (recorded after) stays. With 200 blocks the model's 25 alone would fill less than a quarter,
    but the adapter shares the cache: 65 do, it is an eviction, as with 40 blocks or an
    unknown capacity: the LRU cut keeps `new`."""
    feedback, metrics, spawned = rig.feedback, rig.metrics, rig.spawned
    w = Worker(id="w", url="http://w", capacity_blocks=capacity, listed=frozenset({MODEL, ADAPTER}))
    feedback.workers = lambda worker: w if worker == "w" else None
    adapter = BlockHasher(ADAPTER, B).keys(list(range(40 * B + 1)))
    hasher = BlockHasher(MODEL, B)
    keys = hasher.keys(PROMPT)
    old, new = hasher.keys(SIBLING[::-1]), hasher.keys(PROMPT[::-1])
    later = hasher.keys(SIBLING[::2])
    idx = rig.index

    def plan(depth: int) -> Plan:
        decision = Decision(policy="kv", reason="prefix", ranking=("w",))
        depths = {"w": depth} if depth else {}
        return Plan(decision, keys, USEFUL, depths=depths, indexed=True, block_size=B)

    await idx.record(MODEL, "w", old, ttl_new_ms=600_000)
    await asyncio.sleep(0.05)  # later than the record, on the one clock
    p1 = plan(0)
    feedback.dispatched(MODEL, "w", p1)
    await idx.record(MODEL, "w", keys, ttl_new_ms=600_000)
    await asyncio.sleep(0.05)
    feedback.observe(MODEL, "w", p1, 0)  # a cold prompt, computed: a witness
    feedback.finished(MODEL, "w", p1)
    await idx.record(MODEL, "w", new, ttl_new_ms=600_000)
    await idx.record(ADAPTER, "w", adapter, ttl_new_ms=600_000)
    await asyncio.sleep(0.05)
    p2 = plan(len(keys))
    feedback.dispatched(MODEL, "w", p2)
    await idx.record(MODEL, "w", keys, ttl_new_ms=600_000)
    await asyncio.sleep(0.05)
    await idx.record(MODEL, "w", later, ttl_new_ms=600_000)
    feedback.observe(MODEL, "w", p2, 0)
    feedback.finished(MODEL, "w", p2)
    await asyncio.gather(*spawned)
    assert (await idx.lookup(MODEL, old)).depths == {}
    assert (await idx.lookup(MODEL, keys)).depths == {}  # the chain's own correction
    assert (await idx.lookup(MODEL, new)).depths == ({} if emptied else {"w": len(new)})
    assert (await idx.lookup(MODEL, later)).depths == {"w": len(later)}
    assert (await idx.lookup(ADAPTER, adapter)).depths == ({} if emptied else {"w": 40})
    resets = metrics.registry.get_sample_value(
        "kvrouter_index_reset_clears_total", {"model": MODEL, "worker": "w"}
    )
    assert resets == (1 if emptied else None)


def test_error_event_status_reads_the_engines_error_shapes() -> None:
    from router_node.errors import error_event_status

    assert error_event_status(b'data: {"error": {"message": "x", "code": 503}}\n\n') == 503
    old_vllm = b'data: {"object": "error", "message": "x", "type": "E", "code": 502}\n\n'
    assert error_event_status(old_vllm) == 502
    assert error_event_status(b'data: {"error": {"message": "no code"}}\n\n') == 500
    # A completion whose text mentions an error is not one; nor is a later chunk.
    assert error_event_status(b'data: {"id": "c", "choices": [{"text": "\\"error\\""}]}') is None
    assert error_event_status(b"data: [DONE]\n\n") is None


def test_error_event_in_finds_an_abort_after_other_events() -> None:
    from router_node.errors import error_event_in

    tokens = b'data: {"id": "c", "choices": [{"text": "\\"error\\" data: {\\"error\\""}]}\n\n'
    assert error_event_in(tokens) is None  # quotes inside text are escaped
    abort = b'data: {"error": {"message": "engine restarted", "code": 503}}\n\ndata: [DONE]\n\n'
    assert error_event_in(tokens + abort) == 503
    assert error_event_in(abort) == 503
    # The event's start in this read, its code in the next: taken as a 5xx.
    assert error_event_in(tokens + b'data: {"error": {"message": "eng') == 500
    assert error_event_in(b'data: {"object": "error", "message": "bad", "code": 400}\n\n') == 400


async def test_a_correction_waits_for_the_dispatch_record_it_corrects(rig: Rig) -> None:
    """A worker refuses a request at once (a restarting engine's 503) while the attempt's
    dispatch record is still on its way to Redis: the correction runs after the record
    lands, so no record of a prompt the engine never computed outlives it."""
    feedback, spawned = rig.feedback, rig.spawned
    keys = BlockHasher(MODEL, B).keys(PROMPT)
    idx = rig.index
    decision = Decision(policy="kv", reason="no_match", ranking=("w",))
    plan = Plan(decision, keys, USEFUL, depths={}, indexed=True, block_size=B)
    landed = asyncio.Event()

    async def dispatch() -> bool:
        await landed.wait()  # a slow round trip: it lands after the refusal
        await idx.record(MODEL, "w", keys, ttl_new_ms=600_000)
        return True

    recorded = asyncio.ensure_future(dispatch())
    racing = feedback.dispatched(MODEL, "w", plan)
    feedback.unanswered(MODEL, "w", plan, racing, after=recorded)
    feedback.finished(MODEL, "w", plan)
    await asyncio.sleep(0.05)
    landed.set()
    await asyncio.gather(recorded, *spawned)
    assert (await idx.lookup(MODEL, keys)).depths == {}


async def test_connection_refused_tells_a_closed_port_from_other_failures() -> None:
    port = free_port()  # nothing listens there
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await http.get(f"http://127.0.0.1:{port}/health")
    assert connection_refused(caught.value)
    assert connection_refused(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert not connection_refused(aiohttp.ServerDisconnectedError())
    assert not connection_refused(ConnectionResetError(errno.ECONNRESET, "reset"))
    assert not connection_refused(TimeoutError())


async def test_a_refused_connection_drops_the_workers_records_once_per_outage(rig: Rig) -> None:
    """The first refusal drops every record of the worker last used before it; refusals
    until the worker answers again are the same outage; after an answer, a new one drops
    again (what was recorded since)."""
    feedback, metrics, spawned = rig.feedback, rig.metrics, rig.spawned
    keys = BlockHasher(MODEL, B).keys(PROMPT)
    idx = rig.index
    await idx.record(MODEL, "w", keys, ttl_new_ms=600_000)
    await idx.record(MODEL, "v", keys, ttl_new_ms=600_000)
    await asyncio.sleep(0.01)  # the records' last access is before the refusal
    assert feedback.refused("w")
    await asyncio.gather(*spawned)
    assert (await idx.lookup(MODEL, keys)).depths == {"v": len(keys)}
    await idx.record(MODEL, "w", keys, ttl_new_ms=600_000)
    assert not feedback.refused("w")  # the same outage: nothing more dropped
    await asyncio.gather(*spawned)
    assert (await idx.lookup(MODEL, keys)).depths["w"] == len(keys)
    feedback.answered("w")
    await asyncio.sleep(0.01)
    assert feedback.refused("w")  # a new outage
    await asyncio.gather(*spawned)
    assert "w" not in (await idx.lookup(MODEL, keys)).depths
    text = metrics.render()
    assert 'kvrouter_index_refused_clears_total{model="sim-model",worker="w"} 2.0' in text


async def test_refused_clear_is_a_setting(redis_url: str) -> None:
    settings = RouterSettings(
        redis_url=redis_url, models=(MODEL,), workers=(), feedback_refused_clear=False
    )
    metrics = Metrics()
    spawned: list[Any] = []
    feedback = Feedback(settings, SharedIndex(settings, metrics), metrics, spawned.append)
    assert not feedback.refused("w") and not spawned


async def test_a_request_routed_before_a_restart_clear_drops_its_whole_chain_on_failure(
    rig: Rig,
) -> None:
    """A request matched the dead engine's records before the restart's clear ran; its
    dispatch refreshed them after the clear's cut, then it failed (the worker was down). The
    blocks it matched go too, not only those past its match: otherwise they outlive the
    clear and attract their conversations to the empty cache."""
    feedback, spawned = rig.feedback, rig.spawned
    keys = BlockHasher(MODEL, B).keys(PROMPT)
    idx = rig.index
    depth = len(keys) // 2
    await idx.record(MODEL, "w", keys[:depth], ttl_new_ms=600_000)
    decision = Decision(policy="kv", reason="prefix", ranking=("w",))
    plan = Plan(decision, keys, USEFUL, depths={"w": depth}, indexed=True, block_size=B)
    racing = feedback.dispatched(MODEL, "w", plan)
    await asyncio.sleep(0.01)
    assert feedback.refused("w")  # another request met the closed port
    await asyncio.gather(*spawned)
    # This request's dispatch lands after the clear, then its connection is refused too.
    await idx.record(MODEL, "w", keys, ttl_new_ms=600_000)
    feedback.unanswered(MODEL, "w", plan, racing)
    feedback.finished(MODEL, "w", plan)
    await asyncio.gather(*spawned)
    assert "w" not in (await idx.lookup(MODEL, keys)).depths
    # A request routed after the clear keeps what it matched when it fails.
    await idx.record(MODEL, "w", keys[:depth], ttl_new_ms=600_000)
    later = Plan(decision, keys, USEFUL, depths={"w": depth}, indexed=True, block_size=B)
    feedback.unanswered(MODEL, "w", later, feedback.dispatched(MODEL, "w", later))
    feedback.finished(MODEL, "w", later)
    await asyncio.gather(*spawned)
    assert (await idx.lookup(MODEL, keys)).depths == {"w": depth}
