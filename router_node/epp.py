"""`kvrouter epp`: the router as an endpoint picker (EPP) for Envoy-based inference gateways.

The Gateway API Inference Extension's endpoint-picker protocol over Envoy's ext_proc v3
(gRPC, bodies in FULL_DUPLEX_STREAMED mode). The decision is the router's own
(`RoutingCore.prepare`: parse, tokenize, one Lua lookup, score) and so is the lease
(`RoutingCore.lease`); Envoy carries the bytes. Per request stream:

1. Request headers arrive first and are kept (a request without a body is routed at once,
   by load alone).
2. Body chunks are buffered to end of stream, then the decision is made and sent back, in
   order: a request-headers response (route cache cleared, ``x-gateway-destination-endpoint``
   with the first choice and ``epp_fallbacks`` more, ``ip:port,...``, and the body's
   ``Content-Length``) carrying the dynamic metadata ``envoy.lb`` ->
   ``x-gateway-destination-endpoint`` with the same value; then the body echoed back in
   streamed chunks (in full-duplex mode a body not echoed reaches the worker empty).
3. Response headers tell which endpoint served (``envoy.lb`` ->
   ``x-gateway-destination-endpoint-served`` metadata, or the ``upstream.address``
   attribute); when Envoy fell back to another endpoint the lease and the speculative
   record move to it. Response body chunks are echoed as they come (streaming stays
   streaming); the first one ends the lease's prefill part, the last one the lease.

Errors are ImmediateResponses with an OpenAI-style JSON body: 400 for a body that does not
parse (or a message out of order), 404 for a model the fleet does not serve, 413 over the
body limit, 503 when no endpoint (of the subset hint) can take the request. A failure in one
stream never stops the server. gRPC health: ``liveness``, ``readiness`` and the ext_proc
service name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
from aiohttp import web
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvrouter.discovery.base import EndpointSource
from router_node.admission import Ticket
from router_node.core import RoutingCore, request_priority
from router_node.errors import APIError, bad_request, too_large, unavailable
from router_node.extproc import ext_proc_pb2 as pb
from router_node.extproc import ext_proc_pb2_grpc as pb_grpc
from router_node.metrics import CONTENT_TYPE
from router_node.monitor import Monitor
from router_node.proxy import Lease
from router_node.request import CHAT, COMPLETIONS, ParsedRequest, PromptTokenizer
from router_node.routing import Plan
from router_node.settings import RouterSettings
from router_node.workers import Worker

log = logging.getLogger(__name__)

DESTINATION = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
SUBSET = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICES = ("", "liveness", "readiness", SERVICE_NAME)
ECHO_CHUNK = 62 * 1024
"""Echoed body chunks stay under Envoy's 64 KiB default buffer for one streamed message."""


def _header_map(headers: pb.HeaderMap) -> dict[str, str]:
    # Envoy sends raw_value (bytes); older builds sent value.
    out: dict[str, str] = {}
    for h in headers.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        out[h.key.lower()] = value
    return out


def _struct_strings(value: struct_pb2.Value) -> list[str]:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return [p.strip() for p in value.string_value.split(",") if p.strip()]
    if kind == "list_value":
        return [s for v in value.list_value.values for s in _struct_strings(v)]
    return []


def subset_hint(metadata: pb.Metadata) -> frozenset[str] | None:
    """The endpoints a subset hint allows (``envoy.lb.subset_hint`` filter metadata), or None
    when the request carries no hint."""
    ns = metadata.filter_metadata.get(SUBSET_NAMESPACE)
    if ns is None or SUBSET not in ns.fields:
        return None
    return frozenset(_struct_strings(ns.fields[SUBSET]))


def served_endpoint(msg: pb.ProcessingRequest) -> str | None:
    """The endpoint Envoy sent the request to: the ``envoy.lb`` served metadata, else the
    ``upstream.address`` attribute (Envoy's ``response_attributes``)."""
    ns = msg.metadata_context.filter_metadata.get(LB_NAMESPACE)
    if ns is not None and SERVED in ns.fields:
        found = _struct_strings(ns.fields[SERVED])
        if found:
            return found[0]
    attrs = msg.attributes.get(EXT_PROC_FILTER)
    if attrs is not None and "upstream.address" in attrs.fields:
        found = _struct_strings(attrs.fields["upstream.address"])
        if found:
            return found[0]
    return None


def immediate(err: APIError) -> pb.ProcessingResponse:
    """An error answered by Envoy on the EPP's behalf, with the router's JSON error body."""
    headers = [("content-type", "application/json")]
    if err.retry_after is not None:
        headers.append(("retry-after", str(err.retry_after)))
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=pb.HttpStatus(code=err.status),
            headers=pb.HeaderMutation(set_headers=[_header(k, v) for k, v in headers]),
            body=json.dumps(err.body()).encode(),
            details=f"kvrouter_epp_{err.status}",
        )
    )


def _header(key: str, value: str) -> pb.HeaderValueOption:
    return pb.HeaderValueOption(
        header=pb.HeaderValue(key=key, raw_value=value.encode()),
        append_action=pb.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _echo(body: bytes, *, response: bool) -> Iterator[pb.ProcessingResponse]:
    """The body sent back as streamed body responses, end of stream on the last."""
    chunks = [body[i : i + ECHO_CHUNK] for i in range(0, len(body), ECHO_CHUNK)] or [b""]
    for i, chunk in enumerate(chunks):
        yield _streamed(chunk, i == len(chunks) - 1, response=response)


def _streamed(chunk: bytes, eos: bool, *, response: bool) -> pb.ProcessingResponse:
    mutation = pb.BodyMutation(
        streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=eos)
    )
    body = pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation))
    if response:
        return pb.ProcessingResponse(response_body=body)
    return pb.ProcessingResponse(request_body=body)


def endpoint_of(path: str, body_has_messages: bool) -> str:
    """completions or chat, from the request path (the body's shape for other paths)."""
    path = path.split("?", 1)[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return CHAT
    if path.endswith("/completions"):
        return COMPLETIONS
    return CHAT if body_has_messages else COMPLETIONS


class OutOfOrder(Exception):
    """An ext_proc message that the protocol does not allow at this point of the stream."""


@dataclass
class _Exchange:
    """One request's stream: what arrived so far and the hold on the chosen worker."""

    headers: dict[str, str] = field(default_factory=dict)
    hint: frozenset[str] | None = None
    body: bytearray = field(default_factory=bytearray)
    stage: str = "headers"
    """headers -> body -> sent -> response (-> done)."""
    req: ParsedRequest | None = None
    plan: Plan | None = None
    worker: Worker | None = None
    lease: Lease | None = None
    endpoint: str = ""
    counted: bool = False
    held: bool = False
    """The chosen worker counts this request in flight (the lease may start later)."""
    ticket: Ticket | None = None
    """The admission slot (priority admission), held until the response ends."""
    first_byte: bool = False


class EndpointPicker(pb_grpc.ExternalProcessorServicer):
    """The ext_proc service: one `Process` stream per HTTP request through Envoy."""

    def __init__(self, core: RoutingCore) -> None:
        self.core = core
        self.settings = core.settings

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> AsyncIterator[pb.ProcessingResponse]:
        ex = _Exchange()
        metrics = self.core.metrics
        try:
            async for msg in request_iterator:
                try:
                    out = await self._step(ex, msg)
                except APIError as err:
                    model = ex.req.model if ex.req is not None else ""
                    metrics.requests.labels("epp", str(err.status), model).inc()
                    ex.stage = "done"
                    yield immediate(err)
                    return
                except OutOfOrder as exc:
                    metrics.requests.labels("epp", "400", "").inc()
                    ex.stage = "done"
                    yield immediate(bad_request(f"ext_proc message out of order: {exc}"))
                    return
                for resp in out:
                    yield resp
                if ex.held and ex.lease is None and ex.stage != "done":
                    # The lease's record round trip (and the decision's metrics) start once
                    # the answer is on its way to Envoy: that work then overlaps the
                    # upstream request instead of delaying the answer (the in-flight count
                    # was taken at once).
                    self._lease(ex)
                if ex.stage == "done":
                    return
        finally:
            # Envoy closed the stream (done, the client left, the upstream failed): the
            # lease goes back whichever way it ended.
            self._finish(ex)

    async def _step(self, ex: _Exchange, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            if ex.stage != "headers":
                raise OutOfOrder("request headers after the request started")
            ex.headers = _header_map(msg.request_headers.headers)
            ex.hint = subset_hint(msg.metadata_context)
            if msg.request_headers.end_of_stream:
                return self._route_without_body(ex)
            ex.stage = "body"
            return []
        if kind == "request_body":
            if ex.stage != "body":
                raise OutOfOrder("a request body chunk before the headers or after its end")
            ex.body += msg.request_body.body
            limit = self.settings.max_body_bytes
            if len(ex.body) > limit:
                raise too_large(f"request body exceeds the {limit}-byte limit")
            if msg.request_body.end_of_stream:
                return await self._decide(ex, eos=True)
            return []
        if kind == "request_trailers":
            if ex.stage == "body":
                # The body ended with trailers: decide now, then let the trailers through.
                out = await self._decide(ex, eos=False)
                return [*out, pb.ProcessingResponse(request_trailers=pb.TrailersResponse())]
            if ex.stage != "sent":
                raise OutOfOrder("request trailers before the request headers")
            return [pb.ProcessingResponse(request_trailers=pb.TrailersResponse())]
        if kind == "response_headers":
            if ex.stage != "sent":
                raise OutOfOrder("response headers before the request was routed")
            ex.stage = "response"
            self._settle(ex, served_endpoint(msg))
            if msg.response_headers.end_of_stream:
                self._finish(ex)
            return [pb.ProcessingResponse(response_headers=pb.HeadersResponse())]
        if kind == "response_body":
            if ex.stage != "response":
                raise OutOfOrder("a response body chunk before the response headers")
            if not ex.first_byte and ex.lease is not None:
                ex.first_byte = True
                ex.lease.first_byte()
            chunk = msg.response_body
            if chunk.end_of_stream:
                self._finish(ex)
            return [_streamed(chunk.body, chunk.end_of_stream, response=True)]
        if kind == "response_trailers":
            self._finish(ex)
            return [pb.ProcessingResponse(response_trailers=pb.TrailersResponse())]
        raise OutOfOrder(f"unexpected message {kind!r}")

    def _route_without_body(self, ex: _Exchange) -> list[pb.ProcessingResponse]:
        """A request without a body (GET /v1/models, a health probe): the least-loaded
        available worker, within the subset hint."""
        now = time.monotonic()
        up = [w for w in self.core.pool.workers.values() if w.available(now)]
        if ex.hint is not None:
            up = [w for w in up if w.address in ex.hint]
        if not up:
            raise unavailable("no ready endpoint can take the request", self.settings.retry_after_s)
        ranked = sorted(up, key=lambda w: (w.inflight, random.random()))
        ex.stage = "sent"
        value = ",".join(w.address for w in ranked[: self.settings.epp_fallbacks + 1])
        self.core.metrics.requests.labels("epp", "routed", "").inc()
        return [self._headers_response(value, None)]

    async def _decide(self, ex: _Exchange, *, eos: bool) -> list[pb.ProcessingResponse]:
        raw = bytes(ex.body)
        path = ex.headers.get(":path", "")
        endpoint = endpoint_of(path, b'"messages"' in raw)
        priority = request_priority(self.settings, ex.headers)
        req, plan, ticket = await self.core.prepare(
            endpoint, raw, ex.headers, priority=priority, allowed=ex.hint
        )
        ex.ticket = ticket
        now = time.monotonic()
        ranked: list[Worker] = []
        for wid in plan.decision.ranking:
            w = self.core.pool.get(wid)
            if w is not None and w.available(now):
                ranked.append(w)
            if len(ranked) > self.settings.epp_fallbacks:
                break
        if not ranked:
            raise unavailable(
                f"no ready endpoint serves model {req.model!r}", self.settings.retry_after_s
            )
        ex.req, ex.plan, ex.endpoint = req, plan, endpoint
        self._hold(ex, ranked[0])
        ex.stage = "sent"
        value = ",".join(w.address for w in ranked)
        out = [self._headers_response(value, len(raw))]
        if eos:
            out.extend(_echo(raw, response=False))
        else:
            out.append(_streamed(raw, False, response=False))
        return out

    def _headers_response(self, value: str, length: int | None) -> pb.ProcessingResponse:
        headers = [_header(DESTINATION, value)]
        if length is not None:
            headers.append(_header("content-length", str(length)))
        metadata = struct_pb2.Struct()
        metadata.update({LB_NAMESPACE: {DESTINATION: value}})
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(
                response=pb.CommonResponse(
                    clear_route_cache=True,
                    header_mutation=pb.HeaderMutation(set_headers=headers),
                )
            ),
            dynamic_metadata=metadata,
        )

    def _hold(self, ex: _Exchange, worker: Worker) -> None:
        """Count the request in flight on `worker`; its lease starts in `_lease`."""
        ex.worker = worker
        ex.held = True
        worker.inflight += 1

    def _lease(self, ex: _Exchange) -> None:
        assert ex.req is not None and ex.plan is not None and ex.worker is not None
        if not ex.counted:
            ex.counted = True
            self.core.count(ex.endpoint, ex.req, ex.plan)
            self.core.metrics.requests.labels("epp", "routed", ex.req.model).inc()
        ex.lease = self.core.lease(ex.req, ex.plan, ex.worker)

    def _settle(self, ex: _Exchange, served: str | None) -> None:
        """Move the lease (and the speculative record) to the endpoint that really served,
        when Envoy fell back from the first choice; the first choice counts a failure."""
        w = ex.worker
        if served is None or w is None or w.address == served or ex.req is None:
            return
        target = next((x for x in self.core.pool.workers.values() if x.address == served), None)
        if target is None:
            return
        log.info("Envoy served %s from fallback %s (first choice %s)", ex.req.model, served, w.id)
        self.core.metrics.retries.inc()
        if self.core.pool.record_failure(w, time.monotonic()):
            self.core.metrics.ejections.labels(w.id).inc()
        self._release(ex)
        self._hold(ex, target)

    def _release(self, ex: _Exchange) -> None:
        if ex.held and ex.worker is not None:
            if ex.lease is not None:
                ex.lease.end()
            ex.worker.inflight -= 1
            self.core.metrics.worker_requests.labels(ex.worker.id).inc()
        ex.lease = None
        ex.held = False

    def _finish(self, ex: _Exchange) -> None:
        if ex.held and ex.worker is not None and ex.first_byte:
            self.core.pool.record_success(ex.worker)
        self._release(ex)
        if ex.ticket is not None:
            ex.ticket.release()
            ex.ticket = None
        if ex.plan is not None and ex.req is not None:
            self.core.unreserve(ex.req.model, ex.plan)
        ex.stage = "done"


class EppServer:
    """The endpoint picker serving in the running event loop.

    ext_proc (and gRPC health) on ``epp_port``, gRPC health also on ``epp_health_port``,
    Prometheus text on ``metrics_port`` (HTTP ``/metrics``); port 0 picks a free one, 0 for
    the health or metrics port when ``None`` is given turns it off. The worker monitor (health
    checks, models, discovery) runs as in the proxy.
    """

    def __init__(
        self,
        settings: RouterSettings,
        *,
        tokenizer: PromptTokenizer | None = None,
        rng: random.Random | None = None,
        endpoint_source: EndpointSource | None = None,
    ) -> None:
        self.settings = settings
        self.core = RoutingCore(
            settings, tokenizer=tokenizer, rng=rng, endpoint_source=endpoint_source
        )
        self.picker = EndpointPicker(self.core)
        # The gRPC server and health servicer bind to the running loop: made in start().
        self.health: Any = None
        self.server: Any = None
        self.port = 0
        self.health_port = 0
        self.metrics_port = 0
        self._session: aiohttp.ClientSession | None = None
        self._monitor: Monitor | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._readiness: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        return f"{host}:{self.port}"

    async def start(self) -> EppServer:
        s = self.settings
        await self.core.shared.start()
        self._session = aiohttp.ClientSession()
        self._monitor = Monitor(
            s, self.core.pool, self.core.shared, self._session, self.core.metrics, self.core.source
        )
        self._monitor.start()
        self.health = health.aio.HealthServicer()
        # so_reuseport off: a second picker on a taken port fails instead of sharing it.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ExternalProcessorServicer_to_server(self.picker, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        host = s.host or "0.0.0.0"
        self.port = self.server.add_insecure_port(f"{host}:{s.epp_port}")
        if s.epp_health_port >= 0:
            self.health_port = self.server.add_insecure_port(f"{host}:{s.epp_health_port}")
        await self.server.start()
        for name in ("", "liveness", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self._update_readiness()
        self._readiness = asyncio.get_running_loop().create_task(self._readiness_loop())
        if s.metrics_port >= 0:
            app = web.Application()
            app.router.add_get("/metrics", self._metrics)
            self._metrics_runner = web.AppRunner(app, access_log=None)
            await self._metrics_runner.setup()
            site = web.TCPSite(self._metrics_runner, host, s.metrics_port)
            await site.start()
            sockets = [a for a in self._metrics_runner.addresses if isinstance(a, tuple)]
            self.metrics_port = int(sockets[0][1]) if sockets else s.metrics_port
        log.info("endpoint picker: ext_proc on %s", self.address)
        return self

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.core.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE}
        )

    async def _update_readiness(self) -> None:
        # Ready while some worker can take requests (the shared index being down only
        # degrades routing to local load, as in the proxy).
        now = time.monotonic()
        up = any(w.available(now) for w in self.core.pool.workers.values())
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if up
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("readiness", status)

    async def _readiness_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await self._update_readiness()

    async def close(self, grace_s: float = 1.0) -> None:
        if self._readiness is not None:
            self._readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readiness
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace_s)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._monitor is not None:
            await self._monitor.close()
        await self.core.tasks.drain()
        await self.core.shared.close()
        if self._session is not None:
            await self._session.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()

    async def __aenter__(self) -> EppServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
