"""The ingest path under CPU contention (issue #17 item 3): a listener's first contact with an
engine (clear, then replay) overlapping a burst of live batches, with both cores kept busy by
other processes, run many times. Every batch must end in the index exactly as on a quiet
machine, whichever batch the listener happens to see first.

Not in the default run (marker ``stress``):
``pytest -m stress tests/listener/test_listener_stress.py``; ``KVR_STRESS_RUNS`` sets the runs
per parametrization (default 20). Two listeners: in this process, and ``kvrouter listen`` as a
child process, as the issue's end-to-end run had it.
Loopback only; every wait is bounded; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from eviction_listener.events import BlockRemoved, BlockStored
from eviction_listener.service import Listener
from eviction_listener.settings import ListenerSettings, parse_engines
from kvrouter.index.hashing import BlockHasher
from kvrouter.index.scripts import ResidencyIndex
from tests.support.vllm_publisher import (
    VllmEventPublisher,
    free_tcp_port,
    sync_listener,
    wait_applied,
)

pytestmark = [pytest.mark.redis, pytest.mark.stress]
M = "llama-test"
B = 16
HASHER = BlockHasher(M, B)
ROOT = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("KVR_STRESS_RUNS", "20"))


def tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def toks(chain: int, n_blocks: int) -> list[int]:
    return [(chain * 7919 + 13 * i) % 50_000 for i in range(n_blocks * B)]


def eh(chain: int, i: int) -> int:
    return (1 << 63) + 1000 * chain + i


def stored(chain: int, first: int, n: int, parent: int | None) -> BlockStored:
    from array import array

    t = toks(chain, first + n)[first * B :]
    return BlockStored(
        tuple(eh(chain, first + i) for i in range(n)), parent, array("I", t), B, medium="GPU"
    )


@pytest.fixture(scope="module")
def busy_cores() -> Iterator[None]:
    """Keep every core busy with other processes for the whole module (killed by pid)."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(max(2, os.cpu_count() or 2))
    ]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=10)


@pytest.fixture
async def make_listener(redis_url: str) -> AsyncIterator[Callable[..., Any]]:
    listeners: list[Listener] = []

    async def make(engine: str) -> Listener:
        s = ListenerSettings(
            model=M,
            redis_url=redis_url,
            block_size=B,
            engines=tuple(parse_engines(engine)),
            metrics_port=0,
            metrics_host="127.0.0.1",
            lease_s=2.0,
            notices=False,
        )
        lst = Listener(s)
        listeners.append(lst)
        await lst.start()
        await lst.wait_ticked()
        return lst

    yield make
    for lst in listeners:
        await lst.close()


async def depth(client: Any, chain_tokens: list[int]) -> int:
    keys = HASHER.keys(chain_tokens)
    return (await ResidencyIndex(client).lookup(M, keys)).depth("w")


def spawn(redis_url: str, engine: str) -> subprocess.Popen[bytes]:
    """``kvrouter listen`` as a child process, as operators run it."""
    args = [sys.executable, "-m", "kvrouter", "listen", "--model", M, "--redis-url", redis_url]
    args += ["--engine", engine, "--metrics-port", "0", "--metrics-host", "127.0.0.1"]
    args += ["--notices", "false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.usefixtures("busy_cores")
@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("encoding", ["positional", "map"])
@pytest.mark.parametrize("mode", ["in-process", "kvrouter-listen"])
async def test_first_contact_during_a_burst(
    run: int,
    encoding: str,
    mode: str,
    make_listener: Callable[..., Any],
    redis_client: Any,
    redis_url: str,
) -> None:
    rng = random.Random(run)
    base = free_tcp_port(2)
    pub = VllmEventPublisher(tcp(base), tcp(base + 1), bind=True, encoding=encoding)  # type: ignore[arg-type]
    other = "map" if encoding == "positional" else "positional"
    pauses = [rng.random() * 0.004 for _ in range(6)]
    # A child process takes a second or more to start: spread the burst over its start-up.
    if mode != "in-process":
        pauses = [rng.random() * 0.4 for _ in range(6)]

    def burst() -> None:
        """The engine's batches, from its own thread while the listener starts up."""
        time.sleep(pauses[0] * 10)
        pub.publish([stored(1, 0, 4, None)])  # seq 0: A, 4 blocks
        time.sleep(pauses[1])
        # seq 1: two chained stores after A (B0-B1, then B2), in the other encoding
        pub.encoding = other  # type: ignore[assignment]
        pub.publish([stored(1, 4, 2, eh(1, 3)), stored(1, 6, 1, eh(1, 5))])
        pub.encoding = encoding  # type: ignore[assignment]
        time.sleep(pauses[2])
        # seq 2: C, 4 blocks, and the removal of its third (a hole: C matches 2 blocks)
        pub.publish([stored(3, 0, 4, None), BlockRemoved((eh(3, 2),), "GPU")])
        time.sleep(pauses[3])
        # seq 3: a duplicate copy of A's head, and the removal of B2
        pub.publish([stored(1, 0, 1, None), BlockRemoved((eh(1, 6),), "GPU")])
        pub.publish([stored(4, 0, 2, None)], lost=True)  # seq 4: D, dropped on the wire
        time.sleep(pauses[4])
        pub.publish([stored(5, 0, 2, None)])  # seq 5: E, live

    proc: subprocess.Popen[bytes] | None = None
    try:
        thread = threading.Thread(target=burst)
        thread.start()
        engine = f"w={tcp(base)},replay={tcp(base + 1)}"
        if mode == "in-process":
            await make_listener(engine)
        else:
            proc = spawn(redis_url, engine)
        await asyncio.to_thread(thread.join)
        assert pub.last_seq == 5
        # Make sure the listener has contact even if the whole burst beat its subscription.
        await sync_listener(pub, redis_client, M, "w")
        await wait_applied(redis_client, M, "w", pub.last_seq)
        got = {
            "A+B": await depth(redis_client, toks(1, 7)),
            "C": await depth(redis_client, toks(3, 4)),
            "D": await depth(redis_client, toks(4, 2)),
            "E": await depth(redis_client, toks(5, 2)),
        }
        assert got == {"A+B": 6, "C": 2, "D": 2, "E": 2}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        pub.close()
