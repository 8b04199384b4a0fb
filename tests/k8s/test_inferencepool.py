"""Endpoints from an InferencePool: its selector's Ready pods, one worker per target port,
read from a fake API server that speaks LIST and WATCH over real HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from kvrouter.discovery.base import Endpoint
from kvrouter.discovery.inferencepool import (
    InferencePoolSource,
    endpoints_from_pods,
    pool_selection,
)
from kvrouter.discovery.kubernetes import ApiServer, DiscoveryError
from router_node.settings import RouterSettings, SettingsError

NS = "llm"
POOL = "llama-pool"


def pod(name: str, ip: str, *, ready: bool = True, app: str = "vllm", **kw: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS, "labels": {"app": app}}
    if kw.get("terminating"):
        meta["deletionTimestamp"] = "2026-12-04T00:00:00Z"
    return {
        "metadata": meta,
        "status": {
            "phase": kw.get("phase", "Running"),
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def pool(ports: list[int], labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": POOL, "namespace": NS},
        "spec": {
            "selector": {"matchLabels": labels or {"app": "vllm"}},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": {"name": "kvrouter-epp", "port": {"number": 9002}},
        },
    }


class FakeApi:
    """The InferencePool GET and a Pods LIST + WATCH (label selector honoured)."""

    def __init__(self, the_pool: dict[str, Any]) -> None:
        self.pool = the_pool
        self.pods: dict[str, dict[str, Any]] = {}
        self.rv = 10
        self.watches: list[asyncio.Queue[dict[str, Any] | None]] = []
        self.selectors: list[str] = []
        app = web.Application()
        app.router.add_get(
            f"/apis/inference.networking.k8s.io/v1/namespaces/{NS}/inferencepools/{POOL}",
            self.get_pool,
        )
        app.router.add_get(f"/api/v1/namespaces/{NS}/pods", self.pods_handler)
        self.runner = web.AppRunner(app)
        self.url = ""

    async def start(self) -> FakeApi:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        for q in self.watches:
            q.put_nowait(None)
        await self.runner.cleanup()

    def put(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        kind = "MODIFIED" if obj["metadata"]["name"] in self.pods else "ADDED"
        self.pods[obj["metadata"]["name"]] = obj
        for q in self.watches:
            q.put_nowait({"type": kind, "object": obj})

    async def get_pool(self, request: web.Request) -> web.Response:
        return web.json_response(self.pool)

    def _match(self, p: dict[str, Any], selector: str) -> bool:
        want = dict(part.split("=", 1) for part in selector.split(",") if part)
        labels = p["metadata"].get("labels") or {}
        return all(labels.get(k) == v for k, v in want.items())

    async def pods_handler(self, request: web.Request) -> web.StreamResponse:
        selector = request.query["labelSelector"]
        self.selectors.append(selector)
        if request.query.get("watch") != "1":
            items = [p for p in self.pods.values() if self._match(p, selector)]
            return web.json_response(
                {"kind": "PodList", "metadata": {"resourceVersion": str(self.rv)}, "items": items}
            )
        resp = web.StreamResponse()
        await resp.prepare(request)
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.watches.append(q)
        while (event := await q.get()) is not None:
            if self._match(event["object"], selector):
                await resp.write(json.dumps(event).encode() + b"\n")
        return resp


@pytest.fixture
async def api() -> AsyncIterator[FakeApi]:
    server = await FakeApi(pool([8000, 8001])).start()
    yield server
    await server.stop()


def test_pool_selection_and_pods_to_endpoints() -> None:
    assert pool_selection(pool([8000, 8001], {"b": "2", "a": "1"})) == ("a=1,b=2", (8000, 8001))
    with pytest.raises(DiscoveryError):
        pool_selection({"spec": {"targetPorts": [{"number": 8000}]}})
    with pytest.raises(DiscoveryError):
        pool_selection({"spec": {"selector": {"matchLabels": {"a": "1"}}}})
    pods = [
        pod("p0", "10.0.0.1"),
        pod("p1", "10.0.0.2", ready=False),
        pod("p2", "10.0.0.3", terminating=True),
        pod("p3", "10.0.0.4", phase="Pending"),
        pod("p4", "fd00::5"),
    ]
    got = endpoints_from_pods(pods, (8000, 8001))
    # Each target port of each Ready pod is a worker (DP ranks on separate ports included).
    assert got == [
        Endpoint("p0:8000", "http://10.0.0.1:8000", pod="p0"),
        Endpoint("p0:8001", "http://10.0.0.1:8001", pod="p0"),
        Endpoint("p4:8000", "http://[fd00::5]:8000", pod="p4"),
        Endpoint("p4:8001", "http://[fd00::5]:8001", pod="p4"),
    ]


async def test_the_source_follows_the_pools_pods(api: FakeApi) -> None:
    api.put(pod("a", "10.0.0.1"))
    api.put(pod("other", "10.0.0.9", app="not-in-pool"))
    source = InferencePoolSource(ApiServer(api.url), NS, POOL)
    snaps = source.snapshots()
    first = await asyncio.wait_for(anext(snaps), 5)
    assert [e.worker_id for e in first] == ["a:8000", "a:8001"]
    assert api.selectors[0] == "app=vllm"
    second_snap = asyncio.ensure_future(anext(snaps))  # the source goes on to WATCH
    for _ in range(100):  # the fake keeps no history: change pods once the watch is open
        if api.watches:
            break
        await asyncio.sleep(0.02)
    api.put(pod("b", "10.0.0.2", ready=False))
    api.put(pod("b", "10.0.0.2"))  # becomes Ready
    second = await asyncio.wait_for(second_snap, 5)
    assert [e.worker_id for e in second] == ["a:8000", "a:8001", "b:8000", "b:8001"]
    await source.close()
    await snaps.aclose()


def test_settings_accept_a_pool_instead_of_a_selector() -> None:
    s = RouterSettings(discovery="kubernetes", k8s_inference_pool=POOL, models=("m",))
    assert s.k8s_inference_pool == POOL
    with pytest.raises(SettingsError, match="KVR_K8S_INFERENCE_POOL"):
        RouterSettings(discovery="kubernetes", models=("m",))
