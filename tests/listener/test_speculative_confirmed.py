"""Speculative, then confirmed, end to end (issue #17 item 6): the official openai client
sends a completion through the router to a simulated vLLM worker whose KV events a listener
applies. The router's record at dispatch lives the speculative TTL; the engine's BlockStored
events confirm it (its life extended to the listener's record TTL). A worker whose engine
never confirms (no listener for its events) keeps only the speculative record, which expires
after the speculative TTL.

Loopback only; every wait is bounded; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import openai
import pytest

from eviction_listener.service import Listener
from eviction_listener.settings import ListenerSettings, parse_engines
from kvrouter.index.hashing import BlockHasher
from kvrouter.index.keys import KeySchema
from kvrouter.index.scripts import ResidencyIndex
from kvrouter.sim.fleet import SimFleet
from kvrouter.sim.settings import SimSettings
from kvrouter.tokenizer import Tokenizer
from kvrouter.tokenizer.testing import build_test_tokenizer
from router_node.app import POOL, RouterServer
from router_node.settings import RouterSettings, WorkerSpec
from tests.support.vllm_publisher import applied_seq

pytestmark = pytest.mark.redis
MODEL = "sim-model"
B = 16
PROMPT = [(37 * i + 11) % 20_000 for i in range(B * 10 + 3)]
KEYS = BlockHasher(MODEL, B).keys(PROMPT)
SPECULATIVE_S = 2.0
CONFIRMED_S = 3600.0


async def valid_until_us(client: Any, worker: str) -> list[float]:
    """The valid-until score of each block of PROMPT's chain for `worker` (0: none)."""
    k = KeySchema().model(MODEL).worker(worker)
    scores = await client.zmscore(k, [f"{x:016x}" for x in KEYS])
    return [s or 0.0 for s in scores]


async def server_now_us(client: Any) -> int:
    sec, usec = await client.time()
    return int(sec) * 1_000_000 + int(usec)


async def test_dispatch_is_confirmed_by_the_engine_or_expires(
    redis_url: str, redis_client: Any
) -> None:
    sim = SimSettings(
        workers=2, capacity_tokens=B * 512, time_scale=200.0, base_port=0,
        kv_events_base_port=0, model=MODEL, kv_events="positional",
    )  # fmt: skip
    async with SimFleet(sim) as fleet:
        assert fleet.info is not None
        confirmed, unconfirmed = fleet.info.workers[0], fleet.info.workers[1]
        # The listener reads only the first worker's events: the second one's engine never
        # confirms anything the router records for it.
        listener = Listener(
            ListenerSettings(
                model=MODEL,
                redis_url=redis_url,
                block_size=B,
                metrics_port=0,
                metrics_host="127.0.0.1",
                lease_s=2.0,
                notices=False,
                record_ttl_s=CONFIRMED_S,
                engines=parse_engines(
                    f"{confirmed.id}={confirmed.events_endpoint},replay={confirmed.replay_endpoint}"
                ),
            )
        )
        await listener.start()
        routers = [
            RouterServer(
                RouterSettings(
                    host="127.0.0.1",
                    port=0,
                    redis_url=redis_url,
                    models=(MODEL,),
                    workers=(WorkerSpec.parse(f"{w.id}={w.url}"),),
                    health_interval_s=0,
                    models_interval_s=0.1,
                    kv_events=True,
                    speculative_ttl_s=SPECULATIVE_S,
                    admin_token="t",
                ),
                rng=random.Random(0),
            )
            for w in (confirmed, unconfirmed)
        ]
        for r in routers:
            await r.start()
        try:
            await listener.wait_ticked()
            loop = asyncio.get_running_loop()
            for r, w in zip(routers, (confirmed, unconfirmed), strict=True):
                deadline = loop.time() + 10
                while r.app[POOL].workers[w.id].listed is None:
                    assert loop.time() < deadline
                    await asyncio.sleep(0.02)
            for r in routers:
                client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="k", max_retries=0)
                done = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
                assert done.usage is not None and done.usage.prompt_tokens == len(PROMPT)
                await client.close()
            now = await server_now_us(redis_client)
            # Both workers hold the chain now: one confirmed, one on the dispatch record only.
            # The router writes its dispatch record in the background (it does not hold the
            # request for it), so the answer can come back before the record lands: wait
            # for both.
            idx = ResidencyIndex(redis_client)
            deadline = loop.time() + 10
            while True:
                spec = await valid_until_us(redis_client, unconfirmed.id)
                conf = await valid_until_us(redis_client, confirmed.id)
                seq = await applied_seq(redis_client, MODEL, confirmed.id)
                # Confirmed: the engine's events extended every block's life to about the
                # listener's TTL, far past the speculative one.
                if seq is not None and min(conf) > now + 10 * SPECULATIVE_S * 1e6 and min(spec):
                    break
                assert loop.time() < deadline, f"never confirmed: {conf}, {spec} at {now}"
                await asyncio.sleep(0.05)
            later = await server_now_us(redis_client)
            assert max(conf) <= later + (CONFIRMED_S + 60) * 1e6
            # Written before `later`: valid for at most the speculative TTL past it.
            assert all(0 < s <= later + SPECULATIVE_S * 1e6 for s in spec), spec
            assert (await idx.lookup(MODEL, KEYS)).depths == {
                confirmed.id: len(KEYS),
                unconfirmed.id: len(KEYS),
            }
            # After the speculative TTL only the confirmed record is still matched.
            await asyncio.sleep(SPECULATIVE_S + 0.5)
            assert (await idx.lookup(MODEL, KEYS)).depths == {confirmed.id: len(KEYS)}
        finally:
            for r in routers:
                await r.close()
            await listener.close()


class RouterTokenizer:
    """The router's own tokenizer as the simulator's: the engine then tokenizes a chat
    exactly as the router does (the simulator's default is a byte tokenizer)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode_prompt(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return " tok" * len(token_ids)  # response text is not what this test is about

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return self.tok.encode_chat(messages)


async def test_salted_chat_is_confirmed_by_the_engines_event(
    redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    """Issue #17 item 5: vLLM puts a request's cache_salt in its first block's extra keys; the
    listener folds it into the chain's root as the router does, so the engine's events
    confirm a salted chat's blocks and the router matches them once its own dispatch record
    has expired."""
    sim = SimSettings(
        workers=1, capacity_tokens=B * 512, time_scale=200.0, base_port=0,
        kv_events_base_port=0, model=MODEL, kv_events="map",
    )  # fmt: skip
    tok_dir = build_test_tokenizer(tmp_path / "tok", "llama3")
    tok = RouterTokenizer(Tokenizer.load(tok_dir))
    async with SimFleet(sim, tokenizer=tok) as fleet:
        assert fleet.info is not None
        w = fleet.info.workers[0]
        listener = Listener(
            ListenerSettings(
                model=MODEL,
                redis_url=redis_url,
                block_size=B,
                metrics_port=0,
                metrics_host="127.0.0.1",
                lease_s=2.0,
                notices=False,
                record_ttl_s=CONFIRMED_S,
                engines=parse_engines(f"{w.id}={w.events_endpoint},replay={w.replay_endpoint}"),
            )
        )
        await listener.start()
        router = RouterServer(
            RouterSettings(
                host="127.0.0.1",
                port=0,
                redis_url=redis_url,
                models=(MODEL,),
                workers=(WorkerSpec.parse(f"{w.id}={w.url}"),),
                health_interval_s=0,
                models_interval_s=0.1,
                kv_events=True,
                speculative_ttl_s=SPECULATIVE_S,
                admin_token="t",
                tokenizer=str(tok_dir),
            ),
            rng=random.Random(0),
        )
        await router.start()
        client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="k", max_retries=0)
        messages: Any = [
            {"role": "system", "content": "You answer questions about parcels. " * 30},
            {"role": "user", "content": "Where is parcel 7?"},
        ]
        salted = {"cache_salt": "tenant-a"}
        try:
            await listener.wait_ticked()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while router.app[POOL].workers[w.id].listed is None:
                assert loop.time() < deadline
                await asyncio.sleep(0.02)
            first = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=2, extra_body=salted
            )
            assert first.usage is not None
            n_blocks = first.usage.prompt_tokens // B
            assert n_blocks >= 10
            now = await server_now_us(redis_client)
            wrk = KeySchema().model(MODEL).worker(w.id)
            deadline = loop.time() + 10
            while True:
                scores = [s for _, s in await redis_client.zrange(wrk, 0, -1, withscores=True)]
                confirmed = [s for s in scores if s > now + 10 * SPECULATIVE_S * 1e6]
                if len(confirmed) == n_blocks:
                    break
                assert loop.time() < deadline, f"{len(confirmed)} of {n_blocks} confirmed"
                await asyncio.sleep(0.05)
            # Every block the router recorded at dispatch was confirmed (no speculative-only
            # record left beside the confirmed ones: the keys are the same).
            assert len(scores) == n_blocks
            assert listener.metrics.skipped_blocks["extra_keys"] == 0
            # Past the dispatch record's life, the router matches the confirmed blocks: the
            # same salted chat routes with the match the engine then reports.
            await asyncio.sleep(SPECULATIVE_S + 0.5)
            again = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages, max_tokens=2, extra_body=salted
            )
            usage = again.parse().usage
            assert usage is not None and usage.prompt_tokens_details is not None
            cached = usage.prompt_tokens_details.cached_tokens
            assert cached is not None and cached >= n_blocks * B - B
            assert int(again.headers["x-kvrouter-matched-tokens"]) == cached
            # The same chat without the salt shares nothing, on the engine and in the index.
            plain = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages, max_tokens=2
            )
            assert plain.headers["x-kvrouter-matched-tokens"] == "0"
            usage = plain.parse().usage
            assert usage is not None and usage.prompt_tokens_details is not None
            assert usage.prompt_tokens_details.cached_tokens == 0
        finally:
            await client.close()
            await router.close()
            await listener.close()
