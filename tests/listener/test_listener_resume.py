"""Losing nothing recoverable: a listener SIGKILLed mid-stream and restarted, and a replica
that dies while another takes its workers over, each end with exactly the index a listener
that never stopped built from the same engines (a reference listener under another key
prefix, fed by the same publishers). SIGTERM drains and hands the lease over.

Loopback only; every wait is bounded; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from eviction_listener.service import Listener
from eviction_listener.settings import ListenerSettings, parse_engines
from kvrouter.index.keys import KeySchema
from tests.support.vllm_publisher import (
    VllmEventPublisher,
    applied_seq,
    free_tcp_port,
    sync_listener,
    wait_applied,
)

pytestmark = pytest.mark.redis
M = "llama-test"
B = 16
ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = Path(tempfile.mkdtemp(prefix="kvr-listener-test-"))


def tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


class Stream:
    """A plausible engine: prefills from the root, decode blocks, duplicate copies, and
    tail-first removals, as real-format batches."""

    def __init__(self, pub: VllmEventPublisher, seed: int) -> None:
        self.pub = pub
        self.rng = random.Random(seed)
        self.chains: list[list[int]] = []
        self.next_hash = (1 << 63) + seed * 1_000_000

    def _tokens(self, h: int) -> list[int]:
        return [(h * 31 + i) % 30_000 for i in range(B)]

    def step(self, *, lost: bool = False) -> int:
        r = self.rng.random()
        if r < 0.3 or not self.chains:
            n = self.rng.randint(1, 6)
            hs = [self.next_hash + i for i in range(n)]
            self.next_hash += n
            self.chains.append(hs)
            toks = [t for h in hs for t in self._tokens(h)]
            return self.pub.stored(hs, toks, lost=lost)
        chain = self.rng.choice(self.chains)
        if r < 0.6:
            h = self.next_hash
            self.next_hash += 1
            parent = chain[-1]
            chain.append(h)
            return self.pub.stored([h], self._tokens(h), parent=parent, lost=lost)
        if r < 0.7:
            h = chain[-1]
            parent = chain[-2] if len(chain) > 1 else None
            return self.pub.stored([h], self._tokens(h), parent=parent, lost=lost)
        k = self.rng.randint(1, len(chain))
        tail = chain[-k:][::-1]
        del chain[-k:]
        if not chain:
            self.chains.remove(chain)
        return self.pub.removed(tail, lost=lost)


async def snapshot(client: Any, prefix: str, worker: str) -> tuple[Any, ...]:
    k = KeySchema(prefix).model(M)
    emap = await client.hgetall(k.engine_map(worker))
    wrk = await client.zrange(k.worker(worker), 0, -1)
    cut = await client.zrange(k.cut(worker), 0, -1)
    return dict(emap), sorted(wrk), sorted(cut)


@pytest.fixture
def make_pub() -> Iterator[Callable[..., VllmEventPublisher]]:
    pubs: list[VllmEventPublisher] = []

    def make(*args: Any, **kwargs: Any) -> VllmEventPublisher:
        pub = VllmEventPublisher(*args, **kwargs)
        pubs.append(pub)
        return pub

    yield make
    for p in pubs:
        p.close()


@pytest.fixture
async def make_listener(redis_url: str) -> AsyncIterator[Callable[..., Any]]:
    listeners: list[Listener] = []

    async def make(engines: list[str], **kw: Any) -> Listener:
        kw.setdefault("metrics_port", 0)
        kw.setdefault("metrics_host", "127.0.0.1")
        kw.setdefault("notices", False)
        kw.setdefault("model", M)
        s = ListenerSettings(
            redis_url=redis_url,
            block_size=B,
            engines=tuple(e for x in engines for e in parse_engines(x)),
            **kw,
        )
        lst = Listener(s)
        listeners.append(lst)
        await lst.start()
        await lst.wait_ticked()
        return lst

    yield make
    for lst in listeners:
        await lst.close()


def spawn(redis_url: str, engine: str, *extra: str) -> subprocess.Popen[bytes]:
    """``kvrouter listen`` as a child process (its log goes to a file, never a full pipe)."""
    args = [sys.executable, "-m", "kvrouter", "listen", "--model", M, "--redis-url", redis_url]
    args += ["--engine", engine, "--metrics-port", "0", "--metrics-host", "127.0.0.1"]
    args += ["--listener-id", "subject", "--lease-s", "1", "--notices", "false", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(LOG_DIR / f"listener-{len(list(LOG_DIR.iterdir()))}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)


async def test_killed_listener_restarts_without_losing_anything(
    make_pub: Callable[..., VllmEventPublisher],
    make_listener: Callable[..., Any],
    redis_url: str,
    redis_client: Any,
) -> None:
    base = free_tcp_port(2)
    pub = make_pub(tcp(base), tcp(base + 1), bind=True)
    spec = f"w={tcp(base)},replay={tcp(base + 1)}"
    await make_listener([spec], key_prefix="ref")
    await sync_listener(pub, redis_client, M, "w", prefix="ref")
    proc = spawn(redis_url, spec)
    try:
        await sync_listener(pub, redis_client, M, "w")
        stream = Stream(pub, seed=1)
        for _ in range(40):
            last = stream.step()
        await wait_applied(redis_client, M, "w", last)
        for _ in range(300):
            last = stream.step()
        # Killed mid-stream: some of these batches are applied, some are not.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        stopped_at = await applied_seq(redis_client, M, "w")
        for i in range(60):
            last = stream.step(lost=i % 7 == 0)  # some lost on the wire too
        proc = spawn(redis_url, spec)
        # Nudge the stream (SUB slow joiner), then everything must arrive.
        await sync_listener(pub, redis_client, M, "w")
        last = pub.last_seq
        await wait_applied(redis_client, M, "w", last, prefix="ref")
        assert stopped_at is not None and stopped_at < last
        assert await snapshot(redis_client, "kvr", "w") == await snapshot(redis_client, "ref", "w")
        emap, wrk, _ = await snapshot(redis_client, "kvr", "w")
        assert len(wrk) > 10 and emap
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_sigterm_drains_and_hands_the_lease_over(
    make_pub: Callable[..., VllmEventPublisher], redis_url: str, redis_client: Any
) -> None:
    base = free_tcp_port(2)
    pub = make_pub(tcp(base), tcp(base + 1), bind=True)
    proc = spawn(redis_url, f"w={tcp(base)},replay={tcp(base + 1)}")
    try:
        await sync_listener(pub, redis_client, M, "w")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        owner = await redis_client.hgetall(KeySchema().listener_owner("w"))
        assert owner["owner"] == "subject" and owner["until"] == "0"
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_two_replicas_split_workers_and_take_over(
    make_pub: Callable[..., VllmEventPublisher],
    make_listener: Callable[..., Any],
    redis_client: Any,
) -> None:
    workers = ["w0", "w1", "w2", "w3"]
    specs, pubs = [], {}
    for w in workers:
        base = free_tcp_port(2)
        pubs[w] = make_pub(tcp(base), tcp(base + 1), bind=True)
        specs.append(f"{w}={tcp(base)},replay={tcp(base + 1)}")
    await make_listener(specs, key_prefix="ref")
    a = await make_listener(specs, listener_id="A", lease_s=1.0)
    b = await make_listener(specs, listener_id="B", lease_s=1.0)
    async with asyncio.timeout(20):
        while not (  # noqa: ASYNC110 - ownership converges over a few ticks
            set(a.owned_workers) | set(b.owned_workers) == set(workers)
            and not set(a.owned_workers) & set(b.owned_workers)
            and a.owned_workers
            and b.owned_workers
        ):
            await asyncio.sleep(0.05)
    streams = {w: Stream(p, seed=10 + i) for i, (w, p) in enumerate(pubs.items())}
    for w, p in pubs.items():
        await sync_listener(p, redis_client, M, w)
        await wait_applied(redis_client, M, w, p.last_seq, prefix="ref")
    for _ in range(30):
        for s in streams.values():
            s.step()
    for w, p in pubs.items():
        await wait_applied(redis_client, M, w, p.last_seq)
    # Each batch applied once: every engine-map entry has the refs the reference has.
    for w in workers:
        assert await snapshot(redis_client, "kvr", w) == await snapshot(redis_client, "ref", w)

    gone = a.owned_workers
    await a.abort()  # no drain, no lease release: a crash
    for i in range(30):
        for s in streams.values():
            s.step(lost=i % 5 == 0)
    async with asyncio.timeout(20):
        while set(b.owned_workers) != set(workers):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    for w, p in pubs.items():
        await sync_listener(p, redis_client, M, w)
        await wait_applied(redis_client, M, w, p.last_seq, prefix="ref")
    for w in workers:
        assert await snapshot(redis_client, "kvr", w) == await snapshot(redis_client, "ref", w)
    assert gone and b.metrics.takeovers >= len(workers)


async def test_listeners_of_two_models_each_own_all_their_engines(
    make_pub: Callable[..., VllmEventPublisher],
    make_listener: Callable[..., Any],
) -> None:
    # One listener per base model (the chart's several-model install): each sees only its
    # model's engines, so replicas of another model must not take a share of them. With one
    # fleet-wide live set, rendezvous hashing handed about half of each model's workers to
    # the other model's listener, which never applied them.
    engines = {}
    for w in ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"]:
        base = free_tcp_port(2)
        make_pub(tcp(base), tcp(base + 1), bind=True)
        engines[w] = f"{w}={tcp(base)},replay={tcp(base + 1)}"
    a = await make_listener([engines[w] for w in engines if w[0] == "a"],
                            listener_id="LA", lease_s=1.0)  # fmt: skip
    b = await make_listener([engines[w] for w in engines if w[0] == "b"],
                            listener_id="LB", lease_s=1.0, model="other-model")  # fmt: skip
    async with asyncio.timeout(20):
        while not (  # noqa: ASYNC110 - ownership settles over a few ticks
            a.owned_workers == ["a0", "a1", "a2", "a3"]
            and b.owned_workers == ["b0", "b1", "b2", "b3"]
        ):
            await asyncio.sleep(0.05)
    # And it stays so over further ticks (no hand-over to the other model's replica).
    await asyncio.sleep(2.5)
    assert a.owned_workers == ["a0", "a1", "a2", "a3"]
    assert b.owned_workers == ["b0", "b1", "b2", "b3"]
