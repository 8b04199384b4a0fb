"""The endpoint picker behind a real Envoy: ext_proc in FULL_DUPLEX_STREAMED mode, an
ORIGINAL_DST cluster, simulated vLLM workers, and the official `openai` client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from openai import AsyncOpenAI

from kvrouter.sim.worker import SimWorker
from tests.epp.conftest import MODEL, StartEnvoy, StartEpp

pytestmark = pytest.mark.redis

SYSTEM = list(range(1000, 1320))  # 320 tokens: 20 full blocks of 16


def client(url: str) -> AsyncOpenAI:
    # No client-side retries: every retry seen here is Envoy's, on the picker's fallbacks.
    return AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def prompt(tail: int) -> list[int]:
    return [*SYSTEM, 5000 + tail, 5001 + tail, 5002 + tail]


async def complete(c: AsyncOpenAI, ids: list[int], **kw: Any) -> tuple[str, Any]:
    raw = await c.completions.with_raw_response.create(model=MODEL, prompt=ids, max_tokens=4, **kw)
    return raw.headers["x-sim-worker"], raw.parse()


def by_id(sims: list[SimWorker]) -> dict[str, SimWorker]:
    return {w.worker_id: w for w in sims}


async def test_requests_land_on_the_worker_holding_their_prefix(
    sims: list[SimWorker], start_epp: StartEpp, start_envoy: StartEnvoy
) -> None:
    epp = await start_epp(sims)
    envoy = await start_envoy([epp.port])
    c = client(envoy.url)
    first, _ = await complete(c, prompt(0))
    await asyncio.sleep(0.05)  # the speculative record lands a Redis round trip later
    served = []
    cached = []
    for i in range(1, 7):
        wid, out = await complete(c, prompt(i))
        served.append(wid)
        cached.append(out.usage.prompt_tokens_details.cached_tokens)
    assert served == [first] * 6
    # The worker really had the prefix in its (simulated) KV cache: 20 blocks reused.
    assert min(cached) >= 320
    decisions = epp.core.metrics.decisions.values
    assert sum(v for k, v in decisions.items() if k[0] == "kv") == 7
