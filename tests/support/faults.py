"""Fault scenarios on a real loopback deployment, each under a steady replayed load.

Every scenario starts its own processes (redis-server, one `kvrouter sim` process per
worker so one can be killed alone, `kvrouter listen`, `kvrouter serve`), runs a small
bounded load, injects one fault, heals it, and measures:

- ``failed``: requests that did not complete (non-200, or a stream without ``[DONE]`` or
  with an error event), and ``excused``: those of them that were already streaming from a
  worker when it died (the only failures the design allows);
- ``recovery_s``: from the heal (or the fault, for worker faults) until the router's
  ``/ready`` says ``ready`` again and a request sent after that point hit the shared index
  (``x-kvrouter-matched-tokens`` > 0);
- ``stale``: residency records still pointing at the dead (or restarted) worker after the
  clear grace period.

The test suite (``tests/faults/test_faults_*.py``) asserts on these figures;
``make reliability`` runs them all and writes docs/reliability.md (pytest with
``--reliability-report``, tests/faults/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import aiohttp

from kvrouter.index.connection import connect
from kvrouter.index.keys import KeySchema
from kvrouter.redisproc import RedisServer, RedisUnavailable, free_port
from kvrouter.sim.fleet import read_ready_file
from tests.support.metrics import parse
from tests.support.redis_cluster import RedisClusterProcs

MODEL = "faults-m"
BLOCK = 16
START_TIMEOUT_S = 60.0

# Router settings that make failure detection fast enough for a bounded test.
FAST_ROUTER_ENV: dict[str, str] = {
    "KVR_HEALTH_INTERVAL_S": "0.3",
    "KVR_HEALTH_TIMEOUT_S": "0.5",
    "KVR_CONNECT_TIMEOUT_S": "1",
    "KVR_READ_TIMEOUT_S": "2",
    "KVR_EJECT_FAILURES": "1",
    "KVR_EJECT_S": "1",
    "KVR_EJECT_MAX_S": "2",
    "KVR_CLEAR_GRACE_S": "1.5",
    "KVR_REDIS_TIMEOUT_S": "0.3",
    "KVR_WORKER_CAPACITY_BLOCKS": "4096",
    "KVR_SCRAPE_CAPACITY": "false",
    "KVR_LOG_LEVEL": "warning",
}


class FaultError(RuntimeError):
    """A component of a fault scenario would not start."""


@dataclass
class Proc:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    def start(self) -> Proc:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvrouter", *self.args],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env}, start_new_session=True,
        )  # fmt: skip
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.log is not None:
            self.log.close()
            self.log = None

    def tail(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-1500:]


@dataclass
class SimProc:
    """One `kvrouter sim --workers 1` process: a worker that can be killed alone."""

    wid: str
    proc: Proc
    url: str = ""
    events: str = ""
    replay: str = ""


class Blackhole:
    """A TCP server that accepts connections and never answers: a hung worker."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.conns: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    async def start(self) -> Blackhole:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        for w in self.conns:
            w.close()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


async def wait_http(url: str, proc: Proc | None = None, limit_s: float = START_TIMEOUT_S) -> None:
    """Until GET url answers 200 (fails early when the process exits)."""
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
                raise FaultError(f"{proc.name} exited: {proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise FaultError(f"{url} not ready in {limit_s} s: {proc.tail() if proc else ''}")


@dataclass
class Stack:
    """Redis (given by URL), sim workers, the listener and one router, as processes."""

    redis_url: str
    workers: int = 3
    kv_events: bool = True
    listener: bool = True
    blackhole: bool = False
    router_env: dict[str, str] = field(default_factory=dict)
    sim_args: list[str] = field(default_factory=list)
    extra_engines: list[str] = field(default_factory=list)
    """More `--engine` specs for the listener (e.g. a fake publisher a test controls)."""
    listener_env: dict[str, str] = field(default_factory=dict)
    replicas: int = 1
    routers: list[Proc] = field(default_factory=list)
    router_urls: list[str] = field(default_factory=list)
    sims: list[SimProc] = field(default_factory=list)
    listener_proc: Proc | None = None
    listener_url: str = ""
    router_proc: Proc | None = None
    router_url: str = ""
    hole: Blackhole | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kvr-faults-")))

    def _proc(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        return Proc(name, args, env or {}, self.workdir / f"{name}.log")

    async def start(self) -> Stack:
        for i in range(self.workers):
            ready = self.workdir / f"sim-{i}.json"
            p = self._proc(f"sim-{i}", [
                "sim", "--workers", "1", "--base-port", "0", "--model", MODEL,
                "--block-size", str(BLOCK), "--capacity-tokens", str(4096 * BLOCK),
                "--kv-events", "positional" if self.kv_events else "off",
                "--kv-events-base-port", "0", "--seed", str(i), "--ready-file", str(ready),
                *self.sim_args,
            ]).start()  # fmt: skip
            self.sims.append(SimProc(f"w{i}", p))
        deadline = time.monotonic() + START_TIMEOUT_S
        for i, sp in enumerate(self.sims):
            ready = self.workdir / f"sim-{i}.json"
            while not ready.exists():
                if not sp.proc.alive() or time.monotonic() > deadline:
                    raise FaultError(f"sim-{i} did not start: {sp.proc.tail()}")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.02)
            info = read_ready_file(ready).workers[0]
            sp.url, sp.events, sp.replay = (
                info.url,
                info.events_endpoint or "",
                (info.replay_endpoint or ""),
            )
        if self.kv_events and self.listener:
            self.start_listener()
            await wait_http(f"{self.listener_url}/ready", self.listener_proc)
        if self.blackhole:
            self.hole = await Blackhole().start()
        await self.start_router()
        return self

    def start_listener(self) -> None:
        if not self.listener_url:
            self.listener_url = f"http://127.0.0.1:{free_port()}"
        port = self.listener_url.rsplit(":", 1)[1]
        engines: list[str] = []
        for sp in self.sims:
            engines += ["--engine", f"{sp.wid}={sp.events},replay={sp.replay}"]
        for spec in self.extra_engines:
            engines += ["--engine", spec]
        self.listener_proc = self._proc("listener", [
            "listen", "--redis-url", self.redis_url, "--model", MODEL, "--block-size",
            str(BLOCK), "--metrics-host", "127.0.0.1", "--metrics-port", port, *engines,
        ], {"KVR_WORKER_CAPACITY_BLOCKS": "4096", **self.listener_env}).start()  # fmt: skip

    async def start_router(self) -> None:
        flags: list[str] = []
        for sp in self.sims:
            flags += ["--worker", f"{sp.wid}={sp.url}"]
        if self.hole is not None:
            flags += ["--worker", f"hole={self.hole.url}"]
        env = {
            **FAST_ROUTER_ENV,
            "KVR_KV_EVENTS": "true" if self.kv_events and self.listener else "false",
            **self.router_env,
        }
        for i in range(self.replicas):
            port = free_port()
            name = "router" if i == 0 else f"router-{i}"
            proc = self._proc(name, [
                "serve", "--host", "127.0.0.1", "--port", str(port), "--redis-url",
                self.redis_url, "--model", MODEL, "--block-size", str(BLOCK), *flags,
            ], env).start()  # fmt: skip
            self.routers.append(proc)
            self.router_urls.append(f"http://127.0.0.1:{port}")
        self.router_proc, self.router_url = self.routers[0], self.router_urls[0]
        for proc, url in zip(self.routers, self.router_urls, strict=True):
            await wait_http(f"{url}/ready", proc)

    def sim(self, wid: str) -> SimProc:
        return next(s for s in self.sims if s.wid == wid)

    async def close(self) -> None:
        for proc in self.routers:
            proc.kill(signal.SIGTERM)
        if self.listener_proc is not None:
            self.listener_proc.kill(signal.SIGTERM)
        for sp in self.sims:
            sp.proc.kill(signal.SIGTERM)
        if self.hole is not None:
            await self.hole.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class Outcome:
    start: float
    end: float
    ok: bool
    status: int
    worker: str
    matched: int
    streamed: bool
    error: str = ""


class Load:
    """A steady replayed load: `concurrency` clients replaying conversations that share
    prefixes (pre-tokenized prompts), half of them streaming. ``phase`` switches to a
    disjoint set of conversations (so residency written after a fault is distinguishable)."""

    def __init__(
        self,
        url: str,
        concurrency: int = 4,
        seed: int = 0,
        max_tokens: int = 24,
        conversations: int = 6,
        urls: Sequence[str] = (),
    ):
        self.url = url
        self.urls = list(urls)
        self.conversations = conversations
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.max_tokens = max_tokens
        self.phase = 0
        self.outcomes: list[Outcome] = []
        self.streaming: dict[str, int] = {}
        """Streams under way right now, by worker (headers received, body not finished)."""
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def prompt(self) -> list[int]:
        conv = self.rng.randrange(self.conversations)
        base = 1000 + self.phase * 100_000_000 + conv * 1000
        prefix = [base + i for i in range(48)]
        return prefix + [self.rng.randrange(50_000, 60_000) for _ in range(16)]

    async def one(self, session: aiohttp.ClientSession) -> Outcome:
        stream = self.rng.random() < 0.5
        body = {"model": MODEL, "prompt": self.prompt(), "max_tokens": self.max_tokens,
                "stream": stream}  # fmt: skip
        t0 = time.monotonic()
        status, worker, matched, ok, err, got_bytes = 0, "", 0, False, "", False
        try:
            url = self.rng.choice(self.urls) if self.urls else self.url
            async with session.post(
                f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=20)
            ) as r:
                status = r.status
                worker = r.headers.get("x-kvrouter-worker", "")
                matched = int(r.headers.get("x-kvrouter-matched-tokens", "0") or 0)
                data = b""
                if stream:
                    self.streaming[worker] = self.streaming.get(worker, 0) + 1
                try:
                    async for chunk in r.content.iter_any():
                        got_bytes = True
                        data += chunk
                finally:
                    if stream:
                        self.streaming[worker] -= 1
                if status != 200:
                    err = data[:200].decode(errors="replace")
                elif stream:
                    done = data.rstrip().endswith(b"data: [DONE]")
                    ok = done and b'"error"' not in data
                    if not ok:
                        err = "error event, then [DONE]" if done else "stream truncated"
                else:
                    ok = b'"choices"' in data
        except (aiohttp.ClientError, TimeoutError) as exc:
            err = f"{type(exc).__name__}: {exc}"
        return Outcome(t0, time.monotonic(), ok, status, worker, matched,
                       stream and got_bytes, err)  # fmt: skip

    async def _client(self) -> None:
        assert self._session is not None
        while not self._stop.is_set():
            o = await self.one(self._session)
            self.outcomes.append(o)
            if not o.ok:
                await asyncio.sleep(0.05)  # a client backs off after an error

    async def start(self) -> Load:
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.concurrency)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def failures(self, excuse_worker: str = "", died_at: float = 0.0) -> tuple[int, int]:
        """(failed, excused): excused = streams already running on `excuse_worker` when it
        died at `died_at`."""
        failed = excused = 0
        for o in self.outcomes:
            if o.ok:
                continue
            # Excused: a stream already running on the dying worker that the router ended
            # cleanly (error event, then [DONE]); a truncated stream is never excused.
            if (
                excuse_worker
                and o.worker == excuse_worker
                and o.streamed
                and o.start < died_at
                and o.error != "stream truncated"
            ):
                excused += 1
            else:
                failed += 1
        return failed, excused

    def failure_samples(self) -> list[str]:
        return [f"{o.status} {o.worker} {o.error[:120]}" for o in self.outcomes if not o.ok][:5]


async def ready_status(url: str) -> str:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{url}/ready", timeout=aiohttp.ClientTimeout(total=1)) as r,
        ):
            return str((await r.json()).get("status", ""))
    return ""


async def wait_recovered(load: Load, url: str, since: float, limit_s: float = 20.0) -> float:
    """Seconds from `since` until /ready is 'ready' and a request started after that hit."""
    deadline = time.monotonic() + limit_s
    t_ready: float | None = None
    while time.monotonic() < deadline:
        if t_ready is None and await ready_status(url) == "ready":
            t_ready = time.monotonic()
        if t_ready is not None:
            hits = [o.end for o in load.outcomes if o.start >= t_ready and o.matched > 0 and o.ok]
            if hits:
                return min(hits) - since
        await asyncio.sleep(0.05)
    return float("nan")


@dataclass
class FaultResult:
    fault: str
    requests: int
    failed: int
    excused: int
    recovery_s: float
    stale: int | None
    notes: str = ""
    samples: list[str] = field(default_factory=list)
    exercised: bool = True
    """False when the fault never touched a request (the scenario proved nothing)."""

    def row(self) -> dict[str, Any]:
        return {
            "fault": self.fault,
            "requests": self.requests,
            "failed": self.failed,
            "excused": self.excused,
            "recovery_s": round(self.recovery_s, 2),
            "stale": self.stale,
            "notes": self.notes,
        }


async def worker_records(redis_url: str, wid: str) -> set[str]:
    client = connect(redis_url)
    try:
        return set(await client.zrange(KeySchema().model(MODEL).worker(wid), 0, -1))
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def under_load(
    load_kw: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[RedisServer, Stack, Load]]:
    """A fresh Redis and stack with the steady load running and warmed up; everything is
    stopped and closed on the way out, whatever the scenario did."""
    server = RedisServer().start()
    stack = Stack(server.url)
    load = Load("", **(load_kw or {}))
    try:
        await stack.start()
        load.url = stack.router_url
        await load.start()
        await _warm(load)
        yield server, stack, load
    finally:
        await load.stop()
        await stack.close()
        server.close()


async def _warm(load: Load, seconds: float = 1.5) -> None:
    await asyncio.sleep(seconds)


# -- scenarios ---------------------------------------------------------------------------------
async def redis_restart() -> FaultResult:
    """Redis SIGKILLed for 1.5 s and restarted empty on the same port."""
    async with under_load() as (server, stack, load):
        server.kill()
        await asyncio.sleep(1.5)
        degraded = await ready_status(stack.router_url)
        server.start()
        healed = time.monotonic()
        rec = await wait_recovered(load, stack.router_url, healed)
        await asyncio.sleep(0.5)
        await load.stop()
        failed, excused = load.failures()
        return FaultResult("Redis killed (SIGKILL) 1.5 s, restarted empty", len(load.outcomes),
                           failed, excused, rec, None, f"/ready while down: {degraded}",
                           load.failure_samples())  # fmt: skip


async def worker_killed() -> FaultResult:
    """One sim worker process SIGKILLed mid-stream (long streams in flight)."""
    async with under_load({"concurrency": 6, "max_tokens": 48}) as (server, stack, load):
        # The busiest worker, killed while at least one stream from it is under way.
        served: dict[str, int] = {}
        for o in load.outcomes:
            served[o.worker] = served.get(o.worker, 0) + 1
        victim = max((s.wid for s in stack.sims), key=lambda w: served.get(w, 0))
        deadline = time.monotonic() + 5.0
        while load.streaming.get(victim, 0) == 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a counter the clients update
            await asyncio.sleep(0.005)
        streams_cut = load.streaming.get(victim, 0)
        before = len(await worker_records(server.url, victim))
        stack.sim(victim).proc.kill()
        died = time.monotonic()
        rec = await wait_recovered(load, stack.router_url, died)
        grace = float(FAST_ROUTER_ENV["KVR_CLEAR_GRACE_S"])
        await asyncio.sleep(max(0.0, died + grace + 1.5 - time.monotonic()))
        stale = len(await worker_records(server.url, victim))
        await load.stop()
        failed, excused = load.failures(victim, died)
        n_served = sum(1 for o in load.outcomes if o.worker == victim)
        result = FaultResult("worker process killed (SIGKILL) mid-stream",
                             len(load.outcomes), failed, excused, rec, stale,
                             f"{victim}: {n_served} requests served, {streams_cut} streaming "
                             f"when killed, {before} records before; records checked "
                             f"{grace + 1.5:.1f} s after",
                             load.failure_samples())  # fmt: skip
        result.exercised = streams_cut > 0 and before > 0
        return result


async def worker_blackhole() -> FaultResult:
    """A configured worker accepts TCP and never answers."""
    server = RedisServer().start()
    stack = Stack(server.url, blackhole=True)
    load = Load("")
    try:
        await stack.start()
        t0 = time.monotonic()
        load.url = stack.router_url
        await load.start()
        rec = await wait_recovered(load, stack.router_url, t0)
        await asyncio.sleep(3.0)
        stale = len(await worker_records(server.url, "hole"))
        await load.stop()
        failed, excused = load.failures()
        slow = max((o.end - o.start for o in load.outcomes), default=0.0)
        retries = await _metric(stack.router_url, "kvrouter_retries_total")
        hole_errors = await _metric(
            stack.router_url, "kvrouter_upstream_errors_total", worker="hole"
        )
        result = FaultResult("worker accepts TCP, never answers (blackhole)", len(load.outcomes),
                             failed, excused, rec, stale,
                             f"{hole_errors:.0f} upstream errors on it, {retries:.0f} retried "
                             f"elsewhere; slowest request {slow:.2f} s",
                             load.failure_samples())  # fmt: skip
        result.exercised = hole_errors > 0
        return result
    finally:
        await load.stop()
        await stack.close()
        server.close()


async def _metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples `name` carrying `labels` on `url`/metrics (0 when none, or when
    the process does not answer)."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
            scrape = parse(await r.text())
        return scrape.value(name, **labels) if scrape.has(name, **labels) else 0.0
    return 0.0


async def listener_killed() -> FaultResult:
    """The listener SIGKILLed for 1 s and restarted (same engines, same Redis)."""
    async with under_load() as (_server, stack, load):
        assert stack.listener_proc is not None
        stack.listener_proc.kill()
        await asyncio.sleep(1.0)
        stack.start_listener()
        healed = time.monotonic()
        await wait_http(f"{stack.listener_url}/ready", stack.listener_proc)
        listener_ready = time.monotonic() - healed
        rec = await wait_recovered(load, stack.router_url, healed)
        await asyncio.sleep(0.5)
        await load.stop()
        failed, excused = load.failures()
        return FaultResult("listener killed (SIGKILL) 1 s, restarted", len(load.outcomes), failed,
                           excused, max(rec, listener_ready), None,
                           f"listener /ready after {listener_ready:.2f} s",
                           load.failure_samples())  # fmt: skip


async def _post(url: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(url) as r:
        r.raise_for_status()


async def engine_restart() -> FaultResult:
    """The engine of one worker restarts (cache emptied, event sequence reset, 0.5 s down)."""
    async with under_load() as (server, stack, load):
        victim = "w0"
        old = await worker_records(server.url, victim)
        load.phase = 1  # new conversations from here on: old records are stale by definition
        await _post(f"{stack.sim(victim).url}/admin/restart?down_s=0.5")
        t0 = time.monotonic()
        rec = await wait_recovered(load, stack.router_url, t0)
        await asyncio.sleep(2.0)
        left = len(old & await worker_records(server.url, victim))
        restarts = await _metric(stack.listener_url, "kvrouter_listener_resyncs_total")
        await load.stop()
        # The engine fails the requests it was running, as a crashed vLLM does: streams
        # already under way end with an error event (excused); the rest are retried.
        failed, excused = load.failures(victim, t0)
        return FaultResult("engine restart (cache emptied, seq reset, 0.5 s down)",
                           len(load.outcomes), failed, excused, rec, left,
                           f"{len(old)} records before; listener resyncs {restarts:.0f}",
                           load.failure_samples())  # fmt: skip


async def events_dropped() -> FaultResult:
    """One engine drops 3 event batches (kept for replay): the listener sees a gap."""
    async with under_load() as (_server, stack, load):
        await _post(f"{stack.sim('w2').url}/admin/drop_events?count=3&replay=1")
        t0 = time.monotonic()
        rec = await wait_recovered(load, stack.router_url, t0)
        await asyncio.sleep(1.5)
        gaps = await _metric(stack.listener_url, "kvrouter_listener_gaps_total")
        await load.stop()
        failed, excused = load.failures()
        return FaultResult("engine drops 3 KV-event batches (gap, replayable)",
                           len(load.outcomes), failed, excused, rec, None,
                           f"listener gap counter {gaps:.0f}", load.failure_samples())  # fmt: skip


class SentinelSet:
    """A primary, one replica and three redis-sentinel processes on loopback."""

    def __init__(self) -> None:
        self.primary = RedisServer(args=("--repl-diskless-sync-delay", "0"))
        self.replica: RedisServer | None = None
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.sentinel_ports: list[int] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="kvr-sentinel-"))

    def start(self) -> SentinelSet:
        binary = shutil.which("redis-sentinel") or shutil.which("redis-server")
        if binary is None:
            raise RedisUnavailable("redis-sentinel not found")
        self.primary.start()
        self.replica = RedisServer(
            args=("--replicaof", "127.0.0.1", str(self.primary.port),
                  "--repl-diskless-sync-delay", "0")
        )  # fmt: skip
        self.replica.start()
        for i in range(3):
            port = free_port()
            conf = self.tmp / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.tmp}\n"
                f"sentinel monitor kvr 127.0.0.1 {self.primary.port} 2\n"
                "sentinel down-after-milliseconds kvr 1000\n"
                "sentinel failover-timeout kvr 5000\nsentinel parallel-syncs kvr 1\n"
            )
            cmd = [binary, str(conf)] + ([] if "sentinel" in binary else ["--sentinel"])
            self.sentinels.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))  # fmt: skip
            self.sentinel_ports.append(port)
        return self

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/kvr/0"

    async def wait_synced(self, limit_s: float = 20.0) -> None:
        """Until the replica is in sync and every sentinel knows the replica."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            ok = 0
            assert self.replica is not None
            rc = connect(self.replica.url)
            with contextlib.suppress(Exception):
                info = await rc.info("replication")
                ok = -10 if info.get("master_link_status") != "up" else 0
            await rc.aclose()
            for p in self.sentinel_ports:
                c = connect(f"redis://127.0.0.1:{p}/0")
                with contextlib.suppress(Exception):
                    reps = await c.execute_command("SENTINEL", "REPLICAS", "kvr")
                    sents = await c.execute_command("SENTINEL", "SENTINELS", "kvr")
                    if reps and len(sents) >= 2:
                        ok += 1
                await c.aclose()
            if ok == len(self.sentinel_ports):
                return
            await asyncio.sleep(0.2)
        raise FaultError("sentinels did not discover the replica and each other")

    def close(self) -> None:
        for p in self.sentinels:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)
        if self.replica is not None:
            self.replica.close()
        self.primary.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


async def sentinel_failover() -> FaultResult:
    """The Sentinel-managed primary is SIGKILLed; the sentinels promote its replica."""
    sset = SentinelSet().start()
    stack = Stack(sset.url)
    load = Load("")
    try:
        await sset.wait_synced()
        await stack.start()
        load.url = stack.router_url
        await load.start()
        await _warm(load)
        sset.primary.kill()
        t0 = time.monotonic()
        rec = await wait_recovered(load, stack.router_url, t0, limit_s=30)
        await asyncio.sleep(0.5)
        await load.stop()
        failed, excused = load.failures()
        return FaultResult("Sentinel primary killed, replica promoted", len(load.outcomes), failed,
                           excused, rec, None, "down-after-milliseconds 1000",
                           load.failure_samples())  # fmt: skip
    finally:
        await load.stop()
        await stack.close()
        sset.close()


async def cluster_failover() -> FaultResult:
    """The Cluster master owning the model's slot is SIGKILLed; its replica is promoted."""
    cluster = RedisClusterProcs(masters=3, replicas=1).start()
    stack = Stack(cluster.url)
    load = Load("")
    try:
        await stack.start()
        load.url = stack.router_url
        await load.start()
        await _warm(load)
        client = connect(cluster.url)
        try:
            slot = await client.cluster_keyslot(f"kvr:{{{MODEL}}}:x")
            node = client.get_node_from_key(f"kvr:{{{MODEL}}}:x")
            port = int(node.port)
        finally:
            await client.aclose()
        victim = next(n for n in cluster.nodes if n.port == port)
        victim.kill()
        t0 = time.monotonic()
        rec = await wait_recovered(load, stack.router_url, t0, limit_s=30)
        await asyncio.sleep(0.5)
        await load.stop()
        failed, excused = load.failures()
        return FaultResult("Cluster master of the model's slot killed, replica promoted",
                           len(load.outcomes), failed, excused, rec, None,
                           f"slot {slot}; cluster-node-timeout 2000 ms",
                           load.failure_samples())  # fmt: skip
    finally:
        await load.stop()
        await stack.close()
        cluster.close()


SCENARIOS = {
    "redis_restart": redis_restart,
    "worker_killed": worker_killed,
    "worker_blackhole": worker_blackhole,
    "listener_killed": listener_killed,
    "engine_restart": engine_restart,
    "events_dropped": events_dropped,
    "sentinel_failover": sentinel_failover,
    "cluster_failover": cluster_failover,
}


async def run_all(names: Sequence[str] = ()) -> list[FaultResult]:
    out = []
    for name in names or SCENARIOS:
        out.append(await SCENARIOS[name]())
    return out


# -- index integrity -------------------------------------------------------------------------
_KEY_PATTERNS = [
    r"kvr:\{[^{}]+\}:(wrk|lru|cut|emap):[^\s|]+",
    r"kvr:\{[^{}]+\}:head:[0-9a-f]{16}",
    r"kvr:\{[^{}]+\}:head:@[^\s|]+",
    r"kvr:\{[^{}]+\}:(workers|lseq|load|lease|meta|listeners)",
    r"kvr:(registry|heartbeat)",
    r"kvr:listener:owner:[^\s|]+",
]


def check_index_sync(redis_url: str, models: Sequence[str] = (MODEL,)) -> list[str]:
    """Problems with the index (empty when intact): keys outside the documented schema, a
    residency ZSET member that is not 16 hex digits, or a score that is not an integer."""
    import re

    import redis

    pattern = re.compile("|".join(f"(?:{p})" for p in _KEY_PATTERNS))
    hex16 = re.compile(r"[0-9a-f]{16}")
    problems: list[str] = []
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for key in client.scan_iter(count=1000):
            if not pattern.fullmatch(key):
                problems.append(f"key outside the schema: {key!r}")
                continue
            if ":wrk:" in key or ":lru:" in key or ":cut:" in key or ":head:@" in key:
                pairs = cast(list[Any], client.zrange(key, 0, -1, withscores=True))
                for member, score in pairs:
                    if not hex16.fullmatch(str(member)):
                        problems.append(f"{key}: member {member!r} is not 16 hex digits")
                    if score != int(score):
                        problems.append(f"{key}: score {score!r} is not an integer")
    finally:
        client.close()
    return problems[:20]
