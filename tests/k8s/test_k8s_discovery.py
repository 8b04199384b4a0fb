"""Kubernetes discovery against a fake API server that speaks LIST and WATCH over real HTTP.

The fake keeps a history of watch events by resourceVersion, like the real API server: a
watch from version v gets every event after v, then live ones as chunked JSON lines. Tests
compact the history (so an old version answers 410 Gone), close watches, fail requests and
rotate the token, and check what the source asked for and what it yielded.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kvrouter.discovery import (
    ApiServer,
    DiscoveryError,
    Endpoint,
    EndpointSource,
    KubernetesDiscoveryConfig,
    KubernetesEndpointSource,
    PortNames,
    StaticEndpointSource,
    endpoints_from_slices,
)

NS = "llm"
SELECTOR = "kubernetes.io/service-name=vllm"
PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
STEP = 5.0  # seconds any single expected step may take before the test fails


def endpoint(ip: str, pod: str | None, ready: bool | None = True) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": [ip], "conditions": {}}
    if ready is not None:
        ep["conditions"]["ready"] = ready
    if pod is not None:
        ep["targetRef"] = {"kind": "Pod", "name": pod, "namespace": NS}
    return ep


def eslice(
    name: str,
    endpoints: list[dict[str, Any]],
    *,
    labels: dict[str, str] | None = None,
    ports: dict[str, int] | None = None,
    address_type: str = "IPv4",
) -> dict[str, Any]:
    ports = {"http": 8000, "kv-events": 5557, "kv-replay": 5558} if ports is None else ports
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": "vllm", **(labels or {})},
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()],
    }


class FakeApiServer:
    """Just enough of the Kubernetes API: LIST (paged) and WATCH of EndpointSlices."""

    def __init__(self, token: str = "t0") -> None:
        self.token = token
        self.rv = 100
        self.slices: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[int, dict[str, Any]]] = []
        self.compacted = 0  # versions at or below this answer 410
        self.gone_as_event = False  # 410 as an ERROR event in a 200 stream, not a status
        self.fail_next: list[int] = []  # HTTP statuses to answer the next requests with
        self.requests: list[dict[str, str]] = []
        self.tokens_seen: list[str] = []
        self._streams: list[asyncio.Queue[dict[str, Any] | None]] = []
        self.app = web.Application()
        self.app.router.add_get(PATH, self.handle)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> FakeApiServer:
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close_watches()
        assert self.runner is not None
        await self.runner.cleanup()

    # -- changes, as the EndpointSlice controller would make them --------------------------
    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj = json.loads(json.dumps(obj))
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        event = {"type": kind, "object": obj}
        self.history.append((self.rv, event))
        for q in self._streams:
            q.put_nowait(event)

    def put(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        kind = "MODIFIED" if name in self.slices else "ADDED"
        self.slices[name] = obj
        self._event(kind, obj)

    def delete(self, name: str) -> None:
        self._event("DELETED", self.slices.pop(name))

    def bookmark(self) -> None:
        self.rv += 1
        event = {
            "type": "BOOKMARK",
            "object": {"kind": "EndpointSlice", "metadata": {"resourceVersion": str(self.rv)}},
        }
        for q in self._streams:
            q.put_nowait(event)

    def compact(self) -> None:
        """Forget history: any watch from a version before now gets 410 Gone."""
        self.compacted = self.rv
        self.history.clear()

    def close_watches(self) -> None:
        for q in self._streams:
            q.put_nowait(None)

    def watch_count(self) -> int:
        return sum(1 for r in self.requests if r.get("watch") == "1")

    def list_count(self) -> int:
        return sum(1 for r in self.requests if r.get("watch") != "1" and "continue" not in r)

    # -- the HTTP side ----------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        params = dict(request.query)
        self.requests.append(params)
        self.tokens_seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            body = {"kind": "Status", "code": 401, "message": "Unauthorized"}
            return web.json_response(body, status=401)
        if self.fail_next:
            status = self.fail_next.pop(0)
            body = {"kind": "Status", "code": status, "message": f"injected {status}"}
            return web.json_response(body, status=status)
        assert params.get("labelSelector") == SELECTOR
        if params.get("watch") == "1":
            return await self._watch(request, params)
        names = sorted(self.slices)
        start = int(params.get("continue", "0"))
        limit = int(params.get("limit", "0")) or len(names)
        page = names[start : start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if start + limit < len(names):
            meta["continue"] = str(start + limit)
        items = [self.slices[n] for n in page]
        return web.json_response({"kind": "EndpointSliceList", "metadata": meta, "items": items})

    async def _watch(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        assert params.get("allowWatchBookmarks") == "true"
        since = int(params["resourceVersion"])
        if since < self.compacted:
            gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
            if not self.gone_as_event:
                return web.json_response(gone, status=410)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if since < self.compacted:
            await resp.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            return resp
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        for rv, event in self.history:
            if rv > since:
                queue.put_nowait(event)
        self._streams.append(queue)
        try:
            while (event := await queue.get()) is not None:
                # Split each line in two writes: the client must reassemble lines.
                data = json.dumps(event).encode() + b"\n"
                await resp.write(data[:7])
                await resp.write(data[7:])
        finally:
            self._streams.remove(queue)
        return resp


class Consumer:
    """Runs a source's snapshots() in a task and hands them to the test one by one."""

    def __init__(self, source: KubernetesEndpointSource) -> None:
        self.source = source
        self.queue: asyncio.Queue[list[Endpoint]] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for snap in self.source.snapshots():
            self.queue.put_nowait(snap)

    async def next(self) -> list[Endpoint]:
        return await asyncio.wait_for(self.queue.get(), STEP)

    async def ids(self) -> list[str]:
        return [e.worker_id for e in await self.next()]

    async def close(self) -> None:
        await self.source.close()
        await asyncio.wait_for(self.task, STEP)


async def until(predicate: Any) -> None:
    async with asyncio.timeout(STEP):
        while not predicate():  # noqa: ASYNC110 - polls test state, not the API server
            await asyncio.sleep(0.01)


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as server:
        server.put(
            eslice("vllm-a", [endpoint("10.0.0.1", "vllm-0"), endpoint("10.0.0.2", "vllm-1")])
        )
        yield server


def source(api: FakeApiServer, **kw: Any) -> KubernetesEndpointSource:
    kw.setdefault("backoff_initial_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return KubernetesEndpointSource(ApiServer(api.url, token=api.token), NS, SELECTOR, **kw)


async def test_list_then_watch_yields_snapshots_on_change(api: FakeApiServer) -> None:
    c = Consumer(source(api))
    first = await c.next()
    assert first == [
        Endpoint(
            "vllm-0:8000",
            "http://10.0.0.1:8000",
            "tcp://10.0.0.1:5557",
            "tcp://10.0.0.1:5558",
            0,
            True,
            "vllm-0",
        ),
        Endpoint(
            "vllm-1:8000",
            "http://10.0.0.2:8000",
            "tcp://10.0.0.2:5557",
            "tcp://10.0.0.2:5558",
            0,
            True,
            "vllm-1",
        ),
    ]
    await until(lambda: api.watch_count() == 1)

    api.put(eslice("vllm-b", [endpoint("10.0.1.1", "vllm-2")]))  # ADDED
    assert await c.ids() == ["vllm-0:8000", "vllm-1:8000", "vllm-2:8000"]

    # MODIFIED: vllm-1 fails its readiness probe and leaves the set.
    api.put(
        eslice("vllm-a", [endpoint("10.0.0.1", "vllm-0"), endpoint("10.0.0.2", "vllm-1", False)])
    )
    assert await c.ids() == ["vllm-0:8000", "vllm-2:8000"]

    api.delete("vllm-b")  # DELETED
    assert await c.ids() == ["vllm-0:8000"]

    # A BOOKMARK and a change that leaves the endpoint set as it was yield nothing.
    api.bookmark()
    relabelled = eslice(
        "vllm-a", [endpoint("10.0.0.1", "vllm-0"), endpoint("10.0.0.2", "vllm-1", False)]
    )
    relabelled["metadata"]["annotations"] = {"touched": "yes"}
    api.put(relabelled)
    api.put(eslice("vllm-c", [endpoint("10.0.2.1", "vllm-3")]))
    assert await c.ids() == ["vllm-0:8000", "vllm-3:8000"]
    assert c.queue.empty()
    assert (api.list_count(), api.watch_count()) == (1, 1)
    await c.close()


async def test_closed_watch_resumes_from_last_version_without_relisting(api: FakeApiServer) -> None:
    c = Consumer(source(api))
    await c.next()
    await until(lambda: api.watch_count() == 1)
    api.put(eslice("vllm-b", [endpoint("10.0.1.1", "vllm-2")]))
    await c.next()
    api.bookmark()
    bookmark_rv = str(api.rv)
    await until(lambda: c.source.events == 2)
    api.close_watches()  # the server ends the watch (its timeoutSeconds ran out)
    await until(lambda: api.watch_count() == 2)
    assert api.requests[-1]["resourceVersion"] == bookmark_rv
    assert api.list_count() == 1
    # A change made while no watch was open arrives through the resumed watch's history.
    api.put(eslice("vllm-c", [endpoint("10.0.2.1", "vllm-3")]))
    assert await c.ids() == ["vllm-0:8000", "vllm-1:8000", "vllm-2:8000", "vllm-3:8000"]
    await c.close()


@pytest.mark.parametrize("as_event", [False, True], ids=["http-410", "error-event-410"])
async def test_gone_forces_a_relist(api: FakeApiServer, as_event: bool) -> None:
    api.gone_as_event = as_event
    c = Consumer(source(api))
    await c.next()
    await until(lambda: api.watch_count() == 1)
    # The watch drops and, while it is down, history is compacted past its version and the
    # fleet changes: only a fresh LIST can see the result.
    api.fail_next = [503]
    api.close_watches()
    await until(lambda: len(api.requests) >= 3)
    api.put(eslice("vllm-b", [endpoint("10.0.1.1", "vllm-2")]))
    api.delete("vllm-a")
    api.compact()
    assert await c.ids() == ["vllm-2:8000"]
    assert api.list_count() == 2
    await c.close()


async def test_errors_back_off_and_token_file_is_reread(api: FakeApiServer, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0\n")
    api.fail_next = [500, 500, 500]
    src = KubernetesEndpointSource(
        ApiServer(api.url, token_file=str(token)),
        NS,
        SELECTOR,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    c = Consumer(src)
    assert await c.ids() == ["vllm-0:8000", "vllm-1:8000"]
    assert src.errors == 3 and api.list_count() == 4
    await until(lambda: api.watch_count() == 1)
    # The kubelet rotates the token; the next request must carry the new one.
    token.write_text("t1")
    api.token = "t1"
    api.close_watches()
    await until(lambda: api.watch_count() == 2)
    assert api.tokens_seen[-1] == "Bearer t1"
    api.put(eslice("vllm-b", [endpoint("10.0.1.1", "vllm-2")]))
    assert await c.ids() == ["vllm-0:8000", "vllm-1:8000", "vllm-2:8000"]
    await c.close()


async def test_forbidden_names_the_missing_rbac(
    api: FakeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    api.fail_next = [403]
    with caplog.at_level(logging.WARNING, logger="kvrouter.discovery"):
        c = Consumer(source(api))
        await c.next()
    assert "get, list and watch on endpointslices" in caplog.text
    await c.close()


async def test_idle_watch_does_not_poll(api: FakeApiServer) -> None:
    c = Consumer(source(api))
    await c.next()
    await until(lambda: api.watch_count() == 1)
    await asyncio.sleep(0.5)
    assert len(api.requests) == 2  # one LIST, one WATCH still open
    await c.close()


async def test_list_follows_continue_pages(api: FakeApiServer) -> None:
    for i in range(4):
        api.put(eslice(f"vllm-p{i}", [endpoint(f"10.0.3.{i}", f"vllm-p{i}")]))
    c = Consumer(source(api, page_size=2))
    assert len(await c.next()) == 6
    assert sum(1 for r in api.requests if "continue" in r) == 2
    await c.close()


async def test_close_ends_a_running_watch(api: FakeApiServer) -> None:
    src = source(api)
    c = Consumer(src)
    await c.next()
    await until(lambda: api.watch_count() == 1)
    await c.close()  # would time out if the open watch kept the generator alive
    await src.close()  # idempotent
    assert c.task.done()


async def test_unreachable_api_server_retries_until_closed() -> None:
    src = KubernetesEndpointSource(
        ApiServer("http://127.0.0.1:9"), NS, SELECTOR, backoff_initial_s=0.01, backoff_max_s=0.02
    )
    c = Consumer(src)
    await until(lambda: src.errors >= 3)
    await c.close()
    assert c.queue.empty()


# -- the EndpointSlice -> Endpoint mapping ---------------------------------------------------


def test_dp_size_label_expands_ranks_with_offset_ports() -> None:
    sl = eslice("s", [endpoint("10.0.0.7", "vllm-dp-0")], labels={"kvrouter.io/dp-size": "3"})
    eps = endpoints_from_slices([sl])
    assert [(e.worker_id, e.dp_rank, e.url, e.events_endpoint, e.replay_endpoint) for e in eps] == [
        ("vllm-dp-0:8000", 0, "http://10.0.0.7:8000", "tcp://10.0.0.7:5557", "tcp://10.0.0.7:5558"),
        (
            "vllm-dp-0:8000#dp1",
            1,
            "http://10.0.0.7:8000",
            "tcp://10.0.0.7:5558",
            "tcp://10.0.0.7:5559",
        ),
        (
            "vllm-dp-0:8000#dp2",
            2,
            "http://10.0.0.7:8000",
            "tcp://10.0.0.7:5559",
            "tcp://10.0.0.7:5560",
        ),
    ]


def test_labels_override_named_ports_and_custom_names_work() -> None:
    sl = eslice(
        "s",
        [endpoint("10.0.0.8", "p")],
        labels={"kvrouter.io/kv-events-port": "6000", "kvrouter.io/http-port": "9000"},
        ports={"web": 8000, "ev": 5557},
    )
    [ep] = endpoints_from_slices([sl], PortNames(http="web", events="ev", replay="rp"))
    assert (ep.worker_id, ep.url, ep.events_endpoint, ep.replay_endpoint) == (
        "p:9000",
        "http://10.0.0.8:9000",
        "tcp://10.0.0.8:6000",
        None,
    )


def test_endpoints_without_events_ports_still_route() -> None:
    [ep] = endpoints_from_slices([eslice("s", [endpoint("10.0.0.9", "p")], ports={"http": 8000})])
    assert ep.url == "http://10.0.0.9:8000" and ep.events_endpoint is None


def test_bad_slices_are_skipped_and_reported() -> None:
    problems: list[str] = []
    good = eslice("good", [endpoint("10.0.0.1", "a")])
    no_http = eslice("nohttp", [endpoint("10.0.0.2", "b")], ports={"metrics": 9090})
    bad_dp = eslice("baddp", [endpoint("10.0.0.3", "c")], labels={"kvrouter.io/dp-size": "0"})
    too_far = eslice(
        "far",
        [endpoint("10.0.0.4", "d")],
        labels={"kvrouter.io/dp-size": "9"},
        ports={"http": 1, "kv-events": 65530},
    )
    eps = endpoints_from_slices([good, no_http, bad_dp, too_far], on_problem=problems.append)
    assert [e.worker_id for e in eps] == ["a:8000"]
    assert len(problems) == 3
    assert "no port named 'http'" in problems[0] and "dp-size" in problems[1]


def test_readiness_ipv6_non_pod_and_duplicates() -> None:
    v6 = eslice("v6", [endpoint("fd00::1", "six")], address_type="IPv6")
    plain = eslice("plain", [endpoint("192.0.2.5", None)])
    unknown = eslice("unk", [endpoint("10.0.0.5", "maybe", ready=None)])  # nil means ready
    not_ready = eslice("nr", [endpoint("10.0.0.6", "warming", ready=False)])
    dup_a = eslice("dup-a", [endpoint("10.0.0.7", "twice", ready=False)])
    dup_b = eslice("dup-b", [endpoint("10.0.0.7", "twice", ready=True)])
    eps = endpoints_from_slices([v6, plain, unknown, not_ready, dup_a, dup_b])
    by_id = {e.worker_id: e for e in eps}
    assert sorted(by_id) == ["192.0.2.5:8000", "maybe:8000", "six:8000", "twice:8000"]
    assert by_id["six:8000"].url == "http://[fd00::1]:8000"
    assert by_id["six:8000"].events_endpoint == "tcp://[fd00::1]:5557"
    assert by_id["192.0.2.5:8000"].pod is None and by_id["twice:8000"].ready
    with_nr = endpoints_from_slices([not_ready], include_not_ready=True)
    assert [(e.worker_id, e.ready) for e in with_nr] == [("warming:8000", False)]


# -- configuration -----------------------------------------------------------------------------


def test_config_from_env_and_validation() -> None:
    cfg = KubernetesDiscoveryConfig.from_env(
        {"KVR_K8S_SELECTOR": SELECTOR, "KVR_K8S_NAMESPACE": NS, "KVR_K8S_EVENTS_PORT_NAME": "zmq"}
    )
    assert cfg.ports == PortNames(events="zmq") and cfg.namespace == NS
    with pytest.raises(DiscoveryError, match="KVR_K8S_SELECTOR"):
        KubernetesDiscoveryConfig.from_env({})
    with pytest.raises(DiscoveryError, match="KVR_K8S_HTTP_PORT_NAME"):
        KubernetesDiscoveryConfig.from_env(
            {"KVR_K8S_SELECTOR": "a=b", "KVR_K8S_HTTP_PORT_NAME": "HTTP_port"}
        )
    with pytest.raises(DiscoveryError, match="KVR_K8S_NAMESPACE"):
        KubernetesDiscoveryConfig.from_env(
            {"KVR_K8S_SELECTOR": "a=b", "KVR_K8S_NAMESPACE": "Bad_NS"}
        )


def test_in_cluster_config_from_service_account(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("secret-token\n")
    (tmp_path / "namespace").write_text("inference\n")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    cfg = KubernetesDiscoveryConfig(selector=SELECTOR)
    src = KubernetesEndpointSource.from_config(cfg, env, sa_dir=str(tmp_path))
    assert src.api.url == "https://10.96.0.1:443" and src.namespace == "inference"
    assert src.api.bearer_token() == "secret-token"
    assert "secret-token" not in repr(src.api) and "secret-token" not in repr(src)
    with pytest.raises(DiscoveryError, match="KUBERNETES_SERVICE_HOST"):
        ApiServer.in_cluster({}, str(tmp_path))
    with pytest.raises(DiscoveryError, match="token"):
        ApiServer.in_cluster(env, str(tmp_path / "missing"))
    dev = KubernetesDiscoveryConfig(
        selector=SELECTOR, namespace=NS, api_url="http://127.0.0.1:8001"
    )
    assert KubernetesEndpointSource.from_config(dev, {}).api.url == "http://127.0.0.1:8001"


async def test_static_source_yields_once_and_rejects_duplicate_ids() -> None:
    a, b = Endpoint("b", "http://b:1"), Endpoint("a", "http://a:1")
    src = StaticEndpointSource([a, b])
    assert isinstance(src, EndpointSource)
    assert [snap async for snap in src.snapshots()] == [[b, a]]
    await src.close()
    with pytest.raises(ValueError, match="duplicate worker ids: a"):
        StaticEndpointSource([b, b])
