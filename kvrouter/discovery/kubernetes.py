"""Workers from Kubernetes: a LIST + WATCH of the EndpointSlices selected by labels.

Why EndpointSlices and nothing else
-----------------------------------
The Service in front of the vLLM pods already has a controller that keeps its EndpointSlices
current: one entry per pod with its IP, its readiness, and the pod's name (``targetRef``).
Named Service ports (``http``, ``kv-events``, ``kv-replay``) appear in every slice with the
pod's port numbers, and the Service's labels are copied onto its slices, so everything the
router needs is in one resource kind. The RBAC this needs is get/list/watch on
``endpointslices`` in ``discovery.k8s.io``: no access to pods.

Per-Service settings ride on Service labels (copied to the slices, and the only place a
slice carries anything set by the operator):

    kvrouter.io/dp-size: "4"            one pod serves data-parallel ranks 0..3; rank r
                                        publishes KV events on events port + r
    kvrouter.io/http-port: "8000"       override the named ``http`` port
    kvrouter.io/kv-events-port: "5557"  override (or supply) the KV-events port
    kvrouter.io/kv-replay-port: "5558"  override (or supply) the replay port

A label, when present, wins over the named port.

Worker ids
----------
``<pod name>:<http port>`` for rank 0 and ``<pod name>:<http port>#dp<r>`` for rank r > 0;
``<ip>:<port>`` only for endpoints that are not pods (a hand-made EndpointSlice). A pod name
is unique among live pods and never reused by a different pod at the same time, while a pod
IP is recycled: a new pod that got a dead pod's IP would inherit its cache residency. The
router and the listener both build ids here, so they always agree.

The protocol (plain HTTP + JSON lines, no client library)
---------------------------------------------------------
1. LIST ``/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=...``
   (paged with ``limit``/``continue``), remember the list's ``resourceVersion``, yield a
   snapshot.
2. WATCH the same path with ``watch=1&resourceVersion=<rv>&allowWatchBookmarks=true``: one
   JSON object per line, ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}``.
   Every event moves the remembered resourceVersion on; BOOKMARKs only do that. A snapshot is
   yielded when the computed endpoint set changes.
3. The server ends a watch after ``timeoutSeconds``: watch again from the remembered version.
   ``410 Gone`` (as an HTTP status or an ERROR event) means that version is too old: LIST
   again. Connection errors and other failures retry with capped exponential backoff and
   jitter; nothing ever polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from kvrouter.backoff import Backoff
from kvrouter.discovery.base import Endpoint

log = logging.getLogger("kvrouter.discovery")

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

DP_SIZE_LABEL = "kvrouter.io/dp-size"
HTTP_PORT_LABEL = "kvrouter.io/http-port"
EVENTS_PORT_LABEL = "kvrouter.io/kv-events-port"
REPLAY_PORT_LABEL = "kvrouter.io/kv-replay-port"
ROLE_LABEL = "kvrouter.io/role"
"""prefill, decode or both: the Service's pool (one Service per pool; copied to its slices)."""
ROLES = ("both", "prefill", "decode")

# Environment variables of the Kubernetes discovery settings (the Helm chart sets them).
ENV_NAMESPACE = "KVR_K8S_NAMESPACE"
ENV_SELECTOR = "KVR_K8S_SELECTOR"
ENV_HTTP_PORT_NAME = "KVR_K8S_HTTP_PORT_NAME"
ENV_EVENTS_PORT_NAME = "KVR_K8S_EVENTS_PORT_NAME"
ENV_REPLAY_PORT_NAME = "KVR_K8S_REPLAY_PORT_NAME"
ENV_API_URL = "KVR_K8S_API_URL"  # out-of-cluster development, e.g. behind `kubectl proxy`

PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")  # IANA_SVC_NAME, as in k8s
MAX_DP_SIZE = 1024
MAX_LINE_BYTES = 32 * 1024 * 1024  # one watch event; far above any real EndpointSlice


class DiscoveryError(ValueError):
    """Discovery cannot be configured; the message names the setting or file at fault."""


class ApiError(RuntimeError):
    """The API server answered with an error status (``status`` holds the HTTP code)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API error {status}: {message}")
        self.status = status


class _Gone(Exception):
    """The resourceVersion is too old (410): the only cure is a fresh LIST."""


@dataclass(frozen=True, slots=True)
class PortNames:
    """Names of the Service ports that carry each of an engine's endpoints."""

    http: str = "http"
    events: str = "kv-events"
    replay: str = "kv-replay"

    def __post_init__(self) -> None:
        for env, name in (
            (ENV_HTTP_PORT_NAME, self.http),
            (ENV_EVENTS_PORT_NAME, self.events),
            (ENV_REPLAY_PORT_NAME, self.replay),
        ):
            if not PORT_NAME.match(name):
                raise DiscoveryError(
                    f"{env}: {name!r} is not a Kubernetes port name "
                    "(1-15 lowercase letters, digits and '-')"
                )


@dataclass(frozen=True, slots=True)
class ApiServer:
    """Where the Kubernetes API is and how to authenticate to it.

    ``token_file`` is re-read before every request: projected service-account tokens are
    rotated by the kubelet (hourly by default) and a token read once at start-up expires.
    """

    url: str
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    ca_file: str | None = None
    verify_tls: bool = True

    @classmethod
    def in_cluster(cls, environ: Mapping[str, str], sa_dir: str = SERVICE_ACCOUNT_DIR) -> ApiServer:
        """The API server of the pod this runs in (its service account and CA)."""
        host = environ.get("KUBERNETES_SERVICE_HOST")
        port = environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise DiscoveryError(
                "KUBERNETES_SERVICE_HOST is not set: not running in a Kubernetes pod "
                f"(set {ENV_API_URL} to use an API server from outside, e.g. `kubectl proxy`)"
            )
        token_file = Path(sa_dir, "token")
        if not token_file.is_file():
            raise DiscoveryError(
                f"{token_file} is missing: the pod has no service-account token "
                "(automountServiceAccountToken: false?)"
            )
        if ":" in host:  # IPv6 cluster
            host = f"[{host}]"
        ca = Path(sa_dir, "ca.crt")
        return cls(
            url=f"https://{host}:{port}",
            token_file=str(token_file),
            ca_file=str(ca) if ca.is_file() else None,
        )

    def bearer_token(self) -> str | None:
        if self.token_file is not None:
            return Path(self.token_file).read_text().strip() or None
        return self.token

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.url.startswith("https"):
            return True
        if not self.verify_tls:
            return False
        return ssl.create_default_context(cafile=self.ca_file)


@dataclass(frozen=True, slots=True)
class KubernetesDiscoveryConfig:
    """The ``KVR_K8S_*`` settings: which EndpointSlices to watch and which ports to read.

    ``namespace`` None means the pod's own namespace (from its service account).
    """

    selector: str
    namespace: str | None = None
    ports: PortNames = PortNames()
    api_url: str | None = None

    def __post_init__(self) -> None:
        if not self.selector.strip():
            raise DiscoveryError(
                f"{ENV_SELECTOR} is required with Kubernetes discovery: the label selector "
                "of the vLLM Service's EndpointSlices, e.g. kubernetes.io/service-name=vllm"
            )
        if self.namespace is not None and not re.match(
            r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", self.namespace
        ):
            raise DiscoveryError(f"{ENV_NAMESPACE}: {self.namespace!r} is not a namespace name")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> KubernetesDiscoveryConfig:
        """Read the settings from `environ` (the caller's settings module passes os.environ)."""
        defaults = PortNames()
        return cls(
            selector=environ.get(ENV_SELECTOR, ""),
            namespace=environ.get(ENV_NAMESPACE) or None,
            ports=PortNames(
                http=environ.get(ENV_HTTP_PORT_NAME) or defaults.http,
                events=environ.get(ENV_EVENTS_PORT_NAME) or defaults.events,
                replay=environ.get(ENV_REPLAY_PORT_NAME) or defaults.replay,
            ),
            api_url=environ.get(ENV_API_URL) or None,
        )


def _label_int(labels: Mapping[str, str], key: str, low: int, high: int) -> int | None:
    """A positive integer label in [low, high]; None when absent, ValueError when invalid."""
    raw = labels.get(key)
    if raw is None:
        return None
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ValueError(f"label {key}={raw!r} must be an integer in [{low}, {high}]")
    return int(raw)


def _host(address: str, address_type: str) -> str:
    if address_type == "IPv6" or (address_type != "FQDN" and ":" in address):
        return f"[{ipaddress.IPv6Address(address)}]"
    return address


def endpoints_from_slices(
    slices: Iterable[Mapping[str, Any]],
    ports: PortNames = PortNames(),
    *,
    include_not_ready: bool = False,
    on_problem: Callable[[str], None] | None = None,
) -> list[Endpoint]:
    """The workers described by a set of EndpointSlice objects, sorted by worker id.

    A slice without an HTTP port (named or by label) or with a bad label is skipped and
    reported through `on_problem`. Endpoints whose ``conditions.ready`` is false are left out
    unless `include_not_ready` (then they come with ``ready=False``); a missing condition
    counts as ready, as the API specifies. An endpoint listed in two slices (they overlap
    briefly while the controller rebalances) appears once, ready if either says so.
    """
    found: dict[str, Endpoint] = {}
    for sl in slices:
        meta = sl.get("metadata") or {}
        name = meta.get("name", "?")
        labels: Mapping[str, str] = meta.get("labels") or {}
        address_type = sl.get("addressType", "IPv4")
        named = {p.get("name") or "": p.get("port") for p in sl.get("ports") or []}
        try:
            dp_size = _label_int(labels, DP_SIZE_LABEL, 1, MAX_DP_SIZE) or 1
            http = _label_int(labels, HTTP_PORT_LABEL, 1, 65535) or named.get(ports.http)
            events = _label_int(labels, EVENTS_PORT_LABEL, 1, 65535) or named.get(ports.events)
            replay = _label_int(labels, REPLAY_PORT_LABEL, 1, 65535) or named.get(ports.replay)
            role = (labels.get(ROLE_LABEL) or "both").strip().lower()
            if role not in ROLES:
                raise ValueError(f"label {ROLE_LABEL}={labels[ROLE_LABEL]!r} is not one of {ROLES}")
        except ValueError as exc:
            if on_problem:
                on_problem(f"EndpointSlice {name}: {exc}; skipped")
            continue
        top = max((p for p in (events, replay) if isinstance(p, int)), default=0)
        if top + dp_size - 1 > 65535:
            if on_problem:
                on_problem(f"EndpointSlice {name}: port {top} + dp-size {dp_size} passes 65535")
            continue
        if not isinstance(http, int):
            if on_problem:
                on_problem(
                    f"EndpointSlice {name}: no port named {ports.http!r} and no "
                    f"{HTTP_PORT_LABEL} label; skipped"
                )
            continue
        for ep in sl.get("endpoints") or []:
            addresses = ep.get("addresses") or []
            if not addresses:
                continue
            ready = (ep.get("conditions") or {}).get("ready") is not False
            if not ready and not include_not_ready:
                continue
            try:
                host = _host(addresses[0], address_type)
            except ValueError:
                if on_problem:
                    on_problem(f"EndpointSlice {name}: bad address {addresses[0]!r}; skipped")
                continue
            ref = ep.get("targetRef") or {}
            pod = ref.get("name") if ref.get("kind") == "Pod" else None
            base_id = f"{pod}:{http}" if pod else f"{host}:{http}"
            for rank in range(dp_size):
                worker_id = base_id if rank == 0 else f"{base_id}#dp{rank}"
                endpoint = Endpoint(
                    worker_id=worker_id,
                    url=f"http://{host}:{http}",
                    events_endpoint=f"tcp://{host}:{events + rank}"
                    if isinstance(events, int)
                    else None,
                    replay_endpoint=f"tcp://{host}:{replay + rank}"
                    if isinstance(replay, int)
                    else None,
                    dp_rank=rank,
                    ready=ready,
                    pod=pod,
                    role=role,
                )
                seen = found.get(worker_id)
                if seen is None or (endpoint.ready and not seen.ready):
                    found[worker_id] = endpoint
    return [found[k] for k in sorted(found)]


class KubernetesEndpointSource:
    """Watches EndpointSlices and yields the workers they describe (see the module doc)."""

    def __init__(
        self,
        api: ApiServer,
        namespace: str,
        selector: str,
        *,
        ports: PortNames = PortNames(),
        include_not_ready: bool = False,
        watch_timeout_s: int = 300,
        page_size: int = 500,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.selector = selector
        self.ports = ports
        self.include_not_ready = include_not_ready
        self.watch_timeout_s = watch_timeout_s
        self.page_size = page_size
        self.connect_timeout_s = connect_timeout_s
        self._backoff = Backoff(backoff_initial_s, backoff_max_s, jitter=True)
        self._session: aiohttp.ClientSession | None = None
        self._closed = asyncio.Event()
        self._problems_logged: set[str] = set()
        # Counters a consumer can export as metrics.
        self.lists = 0
        self.watches = 0
        self.events = 0
        self.errors = 0

    @classmethod
    def from_config(
        cls,
        config: KubernetesDiscoveryConfig,
        environ: Mapping[str, str],
        *,
        sa_dir: str = SERVICE_ACCOUNT_DIR,
        include_not_ready: bool = False,
    ) -> KubernetesEndpointSource:
        """In-cluster (service account) unless ``config.api_url`` points elsewhere."""
        api = ApiServer(config.api_url) if config.api_url else ApiServer.in_cluster(environ, sa_dir)
        namespace = config.namespace
        if namespace is None:
            ns_file = Path(sa_dir, "namespace")
            if not ns_file.is_file():
                raise DiscoveryError(f"{ENV_NAMESPACE} is not set and {ns_file} is missing")
            namespace = ns_file.read_text().strip()
        return cls(
            api,
            namespace,
            config.selector,
            ports=config.ports,
            include_not_ready=include_not_ready,
        )

    def __repr__(self) -> str:
        return (
            f"KubernetesEndpointSource(api={self.api.url!r}, namespace={self.namespace!r}, "
            f"selector={self.selector!r})"
        )

    @property
    def _path(self) -> str:
        return f"/apis/discovery.k8s.io/v1/namespaces/{quote(self.namespace)}/endpointslices"

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.api.bearer_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _problem(self, message: str) -> None:
        # Each distinct problem is logged once: a bad label would otherwise be logged on
        # every event of a busy watch.
        if message not in self._problems_logged and len(self._problems_logged) < 1000:
            self._problems_logged.add(message)
            log.warning("%s", message)

    def _snapshot(self, slices: Mapping[str, Mapping[str, Any]]) -> list[Endpoint]:
        return endpoints_from_slices(
            slices.values(),
            self.ports,
            include_not_ready=self.include_not_ready,
            on_problem=self._problem,
        )

    async def _check(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status == 410:
            raise _Gone()
        if resp.status >= 400:
            text = await resp.text()
            with contextlib.suppress(ValueError, AttributeError):
                text = str(json.loads(text).get("message", text))
            text = text[:500]
            if resp.status in (401, 403):
                text += (
                    " (the service account needs get, list and watch on endpointslices "
                    f"in discovery.k8s.io, namespace {self.namespace})"
                )
            raise ApiError(resp.status, text)

    async def _list(
        self, session: aiohttp.ClientSession
    ) -> tuple[dict[str, Mapping[str, Any]], str]:
        slices: dict[str, Mapping[str, Any]] = {}
        cont: str | None = None
        while True:
            params = {"labelSelector": self.selector, "limit": str(self.page_size)}
            if cont:
                params["continue"] = cont
            async with session.get(
                self.api.url + self._path,
                params=params,
                headers=self._headers(),
                ssl=self.api.ssl_context(),
                timeout=aiohttp.ClientTimeout(total=60, connect=self.connect_timeout_s),
            ) as resp:
                await self._check(resp)
                body = await resp.json(content_type=None)
            for item in body.get("items") or []:
                slices[item["metadata"]["name"]] = item
            meta = body.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                self.lists += 1
                return slices, str(meta.get("resourceVersion", ""))

    async def _watch(
        self, session: aiohttp.ClientSession, resource_version: str
    ) -> AsyncGenerator[dict[str, Any], None]:
        # The server ends the watch after timeoutSeconds; jitter keeps many replicas from
        # re-watching in lockstep. The read timeout catches a silently dead connection
        # (bookmarks arrive about once a minute on a live one).
        timeout_s = int(self.watch_timeout_s * random.uniform(1.0, 1.5))
        params = {
            "labelSelector": self.selector,
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        async with session.get(
            self.api.url + self._path,
            params=params,
            headers=self._headers(),
            ssl=self.api.ssl_context(),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self.connect_timeout_s, sock_read=timeout_s + 60
            ),
        ) as resp:
            await self._check(resp)
            self.watches += 1
            buf = b""
            closed = asyncio.ensure_future(self._closed.wait())
            try:
                while True:
                    # Race each read against close(): a quiet watch may send nothing for
                    # minutes, and close() must not wait for it.
                    read = asyncio.ensure_future(resp.content.readany())
                    await asyncio.wait({read, closed}, return_when=asyncio.FIRST_COMPLETED)
                    if not read.done():
                        read.cancel()
                        return
                    chunk = read.result()
                    if not chunk:
                        break
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            yield json.loads(line)
                    if len(buf) > MAX_LINE_BYTES:
                        raise ValueError(f"watch event longer than {MAX_LINE_BYTES} bytes")
            finally:
                closed.cancel()
            if buf.strip():
                yield json.loads(buf)

    async def snapshots(self) -> AsyncIterator[list[Endpoint]]:
        """Full snapshots, the first after the initial LIST, then one per change."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        session = self._session
        slices: dict[str, Mapping[str, Any]] = {}
        version: str | None = None
        last: list[Endpoint] | None = None
        while not self._closed.is_set():
            started = time.monotonic()
            got_event = False
            try:
                if version is None:
                    slices, version = await self._list(session)
                    self._backoff.reset()
                    snap = self._snapshot(slices)
                    if snap != last:
                        last = snap
                        yield snap
                # aclosing: a consumer that stops iterating mid-watch closes the stream now,
                # not when the garbage collector finds the inner generator.
                async with contextlib.aclosing(self._watch(session, version)) as events:
                    async for event in events:
                        kind = event.get("type")
                        obj = event.get("object") or {}
                        if kind == "ERROR":
                            if obj.get("code") == 410:
                                raise _Gone()
                            raise ApiError(int(obj.get("code") or 500), str(obj.get("message")))
                        got_event = True
                        self.events += 1
                        meta = obj.get("metadata") or {}
                        version = str(meta.get("resourceVersion") or version)
                        if kind == "BOOKMARK":
                            continue
                        name = meta.get("name")
                        if kind in ("ADDED", "MODIFIED") and name:
                            slices[name] = obj
                        elif kind == "DELETED" and name:
                            slices.pop(name, None)
                        else:
                            self._problem(f"unexpected watch event type {kind!r}; ignored")
                            continue
                        self._backoff.reset()
                        snap = self._snapshot(slices)
                        if snap != last:
                            last = snap
                            yield snap
                # A watch the server ended on time is normal: watch again from `version`.
                # One that ends at once, empty-handed, would make a tight loop: back off.
                if not got_event and time.monotonic() - started < 1.0:
                    await self._sleep(self._backoff.delay())
            except _Gone:
                log.info("resourceVersion %s expired (410 Gone): listing again", version)
                version = None
                if not got_event:
                    await self._sleep(self._backoff.delay())
            except (aiohttp.ClientError, TimeoutError, ApiError, ValueError, KeyError) as exc:
                self.errors += 1
                delay = self._backoff.delay()
                log.warning(
                    "EndpointSlice %s in %s failed: %s; retrying in %.1fs",
                    "list" if version is None else "watch",
                    self.namespace,
                    exc,
                    delay,
                )
                if isinstance(exc, ApiError) and version is not None:
                    version = None  # an API error mid-watch: start again from a fresh LIST
                await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)

    async def close(self) -> None:
        """End a running ``snapshots()`` (at its next wait) and close the HTTP session."""
        self._closed.set()
        if self._session is not None and not self._session.closed:
            await self._session.close()
