"""A whole kvrouter deployment on loopback, as real processes: Redis, a simulated vLLM fleet,
the eviction listener and one or more router replicas.

The routing benchmark and `kvrouter demo` run every policy on a fresh stack of this kind.
Every component is started through its own command (`kvrouter sim`, `kvrouter listen`,
`kvrouter serve`) exactly as an operator would, so what is measured is what ships. Each
process's output goes to a log file in the stack's work directory for post-mortems.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

from kvrouter.index.connection import connect
from kvrouter.redisproc import RedisServer, free_port, free_ports
from kvrouter.sim.fleet import FleetInfo, read_ready_file
from kvrouter.sim.settings import DEFAULT_CAPACITY_TOKENS

START_TIMEOUT_S = 90.0


class StackError(RuntimeError):
    """A component did not start; the message names it and points at its log."""


@dataclass(frozen=True, slots=True)
class StackConfig:
    workers: int = 8
    policy: str = "kv"
    kv_events: bool = True
    replicas: int = 1
    model: str = "llama-3-8b"
    block_size: int = 16
    capacity_tokens: int = DEFAULT_CAPACITY_TOKENS
    time_scale: float = 1.0
    seed: int = 0
    redis_url: str | None = None
    extra_router_env: tuple[tuple[str, str], ...] = ()
    prefill_tokens_per_s: float | None = None
    """Each worker's prefill throughput (None: the simulator's default)."""
    speed_mix: str = ""
    """The simulator's ``--speed-mix`` (speed factors given to the workers in turn)."""
    sim_args: tuple[str, ...] = ()
    """Extra `kvrouter sim` flags (e.g. a smaller --max-batch to saturate the fleet)."""
    adapters: tuple[str, ...] = ()
    """LoRA adapters of `model` every simulated worker also serves (routers learn them from
    the workers' /v1/models; the listener indexes their events under their own names)."""
    prefill_workers: int = 0
    """Prefill/decode disaggregation: the first N simulated workers are prefill workers and
    the routers get them as ``@prefill``, the others as ``@decode`` (0 = no split)."""
    extra_sim_args: tuple[str, ...] = ()
    """More `kvrouter sim` flags (engine speed, link bandwidth)."""


@dataclass
class _Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]


@dataclass
class LocalStack:
    """`async with LocalStack(config) as stack:` then send traffic to `stack.router_urls`."""

    config: StackConfig
    workdir: Path | None = None
    fleet: FleetInfo | None = None
    router_urls: list[str] = field(default_factory=list)
    listener_url: str | None = None
    redis_url: str = ""
    _procs: list[_Proc] = field(default_factory=list)
    _redis: RedisServer | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> _Proc:
        assert self.workdir is not None
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvrouter", *args],
            stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
        )  # fmt: skip
        p = _Proc(name, proc, log_path, log)
        self._procs.append(p)
        return p

    def _fail(self, p: _Proc, why: str) -> StackError:
        tail = p.log_path.read_text(errors="replace")[-1500:] if p.log_path.exists() else ""
        return StackError(f"{p.name} {why}; log {p.log_path}:\n{tail}")

    async def _wait_http(self, p: _Proc, url: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if p.proc.poll() is not None:
                    raise self._fail(p, f"exited with code {p.proc.returncode}")
                try:
                    async with s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)
        raise self._fail(p, f"was not ready at {url} within {START_TIMEOUT_S:.0f} s")

    async def start(self) -> LocalStack:
        cfg = self.config
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kvr-stack-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if cfg.redis_url:
            self.redis_url = cfg.redis_url
            client = connect(self.redis_url)
            try:
                await client.flushall()
            finally:
                await client.aclose()
        else:
            self._redis = RedisServer().start()
            self.redis_url = self._redis.url

        ready = self.workdir / "sim-ready.json"
        sim = self._spawn("sim", [
            "sim", "--workers", str(cfg.workers), "--base-port", "0",
            "--model", cfg.model, "--block-size", str(cfg.block_size),
            "--capacity-tokens", str(cfg.capacity_tokens), "--time-scale", str(cfg.time_scale),
            "--kv-events", "positional" if cfg.kv_events else "off",
            # Free ZMQ ports too: a fixed base port collides with any other stack on the host.
            "--kv-events-base-port", "0",
            "--seed", str(cfg.seed), "--ready-file", str(ready),
            *(["--lora-adapters", ",".join(cfg.adapters)] if cfg.adapters else []),
            *(["--prefill-tokens-per-s", str(cfg.prefill_tokens_per_s)]
              if cfg.prefill_tokens_per_s else []),
            *(["--speed-mix", cfg.speed_mix] if cfg.speed_mix else []),
            "--prefill-workers", str(cfg.prefill_workers), *cfg.extra_sim_args, *cfg.sim_args,
        ])  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if sim.proc.poll() is not None:
                raise self._fail(sim, f"exited with code {sim.proc.returncode}")
            if time.monotonic() > deadline:
                raise self._fail(sim, "wrote no ready file")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.05)  # the writer renames atomically; be gentle anyway
        self.fleet = read_ready_file(ready)
        capacity_blocks = self.fleet.num_gpu_blocks

        common_env = {"KVR_WORKER_CAPACITY_BLOCKS": str(capacity_blocks)}
        if cfg.kv_events:
            port = free_port()
            engines: list[str] = []
            for w in self.fleet.workers:
                spec = f"{w.id}={w.events_endpoint}"
                if w.replay_endpoint:
                    spec += f",replay={w.replay_endpoint}"
                engines += ["--engine", spec]
            listener = self._spawn("listener", [
                "listen", "--redis-url", self.redis_url, "--model", cfg.model,
                "--block-size", str(cfg.block_size), "--metrics-port", str(port), *engines,
            ], common_env)  # fmt: skip
            self.listener_url = f"http://127.0.0.1:{port}"
            await self._wait_http(listener, f"{self.listener_url}/ready")

        worker_flags: list[str] = []
        for w in self.fleet.workers:
            role = f"@{w.role}" if w.role != "both" else ""
            worker_flags += ["--worker", f"{w.id}={w.url}{role}"]
        router_env = {
            **common_env,
            "KVR_KV_EVENTS": "true" if cfg.kv_events else "false",
            **({"KVR_MODELS_INTERVAL_S": "0.5"} if cfg.adapters else {}),
            **dict(cfg.extra_router_env),
        }
        routers = []
        for i, port in enumerate(free_ports(cfg.replicas)):
            p = self._spawn(f"router-{i}", [
                "serve", "--host", "127.0.0.1", "--port", str(port), "--redis-url", self.redis_url,
                "--model", cfg.model, "--block-size", str(cfg.block_size),
                "--policy", cfg.policy, *worker_flags,
            ], router_env)  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            routers.append((p, url))
            self.router_urls.append(url)
        for p, url in routers:
            await self._wait_http(p, f"{url}/ready")
            if cfg.adapters:
                await self._wait_models(p, url, {cfg.model, *cfg.adapters})
        return self

    async def _wait_models(self, p: _Proc, url: str, models: set[str]) -> None:
        """Until the router's /v1/models lists `models` (its first poll of the workers)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                async with s.get(f"{url}/v1/models") as r:
                    body = await r.json()
                if models <= {m["id"] for m in body.get("data", [])}:
                    return
                await asyncio.sleep(0.1)
        raise self._fail(p, f"did not list {sorted(models)} within {START_TIMEOUT_S:.0f} s")

    async def metrics(self, url: str) -> str:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
            return await r.text()

    def close(self) -> None:
        for p in reversed(self._procs):
            if p.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, signal.SIGTERM)
        for p in reversed(self._procs):
            try:
                p.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.proc.pid, signal.SIGKILL)
                p.proc.wait(timeout=5)
            p.log.close()
        self._procs.clear()
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> LocalStack:
        try:
            return await self.start()
        except BaseException:
            self.close()
            raise

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
