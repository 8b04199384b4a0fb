"""Workers from a Gateway API Inference Extension InferencePool: its selector's Ready pods.

An InferencePool (``inference.networking.k8s.io/v1``) names its model servers by a label
selector (``spec.selector.matchLabels``, pods of the pool's namespace) and the ports they
serve on (``spec.targetPorts[].number``). Every target port of every Ready pod is one
endpoint: a pod running data-parallel ranks on separate ports gives one endpoint per rank,
and the gateway (Envoy, through the endpoint picker) addresses each as ``ip:port``.

The watch is the EndpointSlice watch's own machinery (LIST, WATCH from the list's
resourceVersion, 410 -> LIST again, backoff), pointed at Pods. The pool itself is read at
every LIST: a watch ends after its timeout (5 minutes by default) and the next LIST picks up
a changed selector or port list. RBAC: get on ``inferencepools`` and get/list/watch on
``pods`` in the pool's namespace.

Worker ids are ``<pod name>:<port>`` as for EndpointSlices (a pod IP is recycled, a live
pod's name is not).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from kvrouter.discovery.base import Endpoint
from kvrouter.discovery.kubernetes import (
    ApiError,
    ApiServer,
    DiscoveryError,
    KubernetesEndpointSource,
)

POOL_API = "/apis/inference.networking.k8s.io/v1"


def pool_selection(pool: Mapping[str, Any]) -> tuple[str, tuple[int, ...]]:
    """(label selector, target ports) of an InferencePool object; DiscoveryError when the
    pool has no usable selector or ports."""
    spec = pool.get("spec") or {}
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    if not isinstance(labels, dict) or not labels:
        raise DiscoveryError("the InferencePool has no spec.selector.matchLabels")
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    ports: list[int] = []
    for entry in spec.get("targetPorts") or []:
        number = entry.get("number") if isinstance(entry, dict) else None
        if isinstance(number, int) and 0 < number < 65536:
            ports.append(number)
    if not ports:
        raise DiscoveryError("the InferencePool has no spec.targetPorts[].number")
    return selector, tuple(ports)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Running, Ready, not terminating, with an IP."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    if not status.get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def endpoints_from_pods(pods: Iterable[Mapping[str, Any]], ports: Iterable[int]) -> list[Endpoint]:
    """One endpoint per target port of each Ready pod, sorted by worker id."""
    out: list[Endpoint] = []
    ports = tuple(ports)
    for pod in pods:
        if not pod_ready(pod):
            continue
        name = str((pod.get("metadata") or {}).get("name") or "")
        ip = str(pod["status"]["podIP"])
        host = f"[{ip}]" if ":" in ip else ip
        for port in ports:
            wid = f"{name}:{port}" if name else f"{host}:{port}"
            out.append(Endpoint(wid, f"http://{host}:{port}", pod=name or None))
    return sorted(out, key=lambda e: e.worker_id)


class InferencePoolSource(KubernetesEndpointSource):
    """Watches the Ready pods an InferencePool selects (see the module doc)."""

    def __init__(self, api: ApiServer, namespace: str, pool: str, **kw: Any) -> None:
        super().__init__(api, namespace, "", **kw)
        self.pool = pool
        self.target_ports: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return (
            f"InferencePoolSource(api={self.api.url!r}, namespace={self.namespace!r}, "
            f"pool={self.pool!r})"
        )

    @property
    def _path(self) -> str:
        return f"/api/v1/namespaces/{quote(self.namespace)}/pods"

    async def _check(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status in (401, 403):
            text = await resp.text()
            with contextlib.suppress(ValueError, AttributeError):
                text = str(json.loads(text).get("message", text))
            raise ApiError(
                resp.status,
                f"{text[:500]} (the service account needs get on inferencepools in "
                f"inference.networking.k8s.io and get, list and watch on pods, "
                f"namespace {self.namespace})",
            )
        await super()._check(resp)

    async def _read_pool(self, session: aiohttp.ClientSession) -> None:
        url = f"{self.api.url}{POOL_API}/namespaces/{quote(self.namespace)}/inferencepools/"
        async with session.get(
            url + quote(self.pool),
            headers=self._headers(),
            ssl=self.api.ssl_context(),
            timeout=aiohttp.ClientTimeout(total=60, connect=self.connect_timeout_s),
        ) as resp:
            await self._check(resp)
            body = await resp.json(content_type=None)
        try:
            selector, ports = pool_selection(body)
        except DiscoveryError as exc:
            # Retried with backoff like any API failure: the pool may be fixed.
            raise ApiError(422, f"InferencePool {self.namespace}/{self.pool}: {exc}") from None
        self.selector, self.target_ports = selector, ports

    async def _list(
        self, session: aiohttp.ClientSession
    ) -> tuple[dict[str, Mapping[str, Any]], str]:
        await self._read_pool(session)
        return await super()._list(session)

    def _snapshot(self, slices: Mapping[str, Mapping[str, Any]]) -> list[Endpoint]:
        return endpoints_from_pods(slices.values(), self.target_ports)
