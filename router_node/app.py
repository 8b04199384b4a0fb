"""The router's aiohttp application: `create_app(settings)` and its handlers.

Resources live in cleanup contexts, one each: the shared index (Redis client), the upstream
``ClientSession`` (one per app), and the background monitor. `RouterServer` runs an app on a
port inside the current event loop (tests, benchmarks, the demo); the CLI uses ``run_app``.
Both turn on aiohttp's handler cancellation, so a client that disconnects cancels its
upstream request.
"""

from __future__ import annotations

import hmac
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry.trace import SpanKind, Tracer

from kvrouter.discovery.base import EndpointSource
from router_node.admission import Admission
from router_node.core import RoutingCore, load_tokenizer, request_priority
from router_node.edge import (
    ConcurrencyGate,
    EdgeRunner,
    RateLimiter,
    client_key,
    overloaded,
    rate_limited,
)
from router_node.errors import APIError, bad_request, not_found, too_large, unauthorized
from router_node.loop_lag import LoopLagProbe
from router_node.metrics import CONTENT_TYPE, Metrics
from router_node.monitor import Monitor
from router_node.proxy import HEADER_WORKER, STARTED, BackgroundTasks, Proxy
from router_node.request import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    LOAD_ONLY,
    RESPONSES,
    ParsedRequest,
    PromptTokenizer,
    parse_body,
    parse_request,
    tokenize,
)
from router_node.routing import Plan, Router
from router_node.settings import RouterSettings
from router_node.shared_index import SharedIndex
from router_node.tracing import (
    ATTR_CHOSEN,
    ATTR_MATCHED,
    ATTR_MODEL,
    ATTR_REASON,
    ATTR_STATUS,
    ATTR_WORKER,
    extract,
    recording,
)
from router_node.workers import WorkerPool

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", RouterSettings)
METRICS = web.AppKey("metrics", Metrics)
POOL = web.AppKey("pool", WorkerPool)
SHARED = web.AppKey("shared_index", SharedIndex)
ROUTER = web.AppKey("router", Router)
TASKS = web.AppKey("tasks", BackgroundTasks)
TOKENIZER: web.AppKey[PromptTokenizer | None] = web.AppKey("tokenizer")
"""Tokenizer per base model (an adapter uses its base model's)."""
SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
PROXY = web.AppKey("proxy", Proxy)
MONITOR = web.AppKey("monitor", Monitor)
SOURCE: web.AppKey[EndpointSource | None] = web.AppKey("endpoint_source")
# The request's model, once parsed, for the per-model request counter in the middleware.
_MODEL = web.RequestKey("model", str)
LIMITER = web.AppKey("rate_limiter", RateLimiter)
ADMISSION = web.AppKey("admission", Admission)
GATE = web.AppKey("concurrency_gate", ConcurrencyGate)
TRACER = web.AppKey("tracer", Tracer)
CORE = web.AppKey("routing_core", RoutingCore)
"""The decision path both front ends share (router_node/core.py)."""

__all__ = ["RouterServer", "create_app", "load_tokenizer", "settings_summary"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    settings: RouterSettings,
    *,
    tokenizer: PromptTokenizer | None = None,
    rng: random.Random | None = None,
    endpoint_source: EndpointSource | None = None,
    tracer_provider: Any | None = None,
) -> web.Application:
    """The router app. Loads the tokenizer from ``settings.tokenizer`` unless one is given
    (so a bad tokenizer path fails here, at start-up). With ``discovery=kubernetes`` it
    builds the EndpointSlice watch unless `endpoint_source` is given (tests, embedding).
    Spans go to `tracer_provider`, else to the global one (router_node/tracing.py)."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_errors_middleware])
    core = RoutingCore(
        settings,
        tokenizer=tokenizer,
        rng=rng,
        endpoint_source=endpoint_source,
        tracer_provider=tracer_provider,
    )
    app[CORE] = core
    app[SETTINGS] = settings
    app[METRICS] = core.metrics
    app[POOL] = core.pool
    app[SHARED] = core.shared
    app[ROUTER] = core.router
    app[TRACER] = core.tracer
    app[TASKS] = core.tasks
    app[ADMISSION] = core.admission
    app[TOKENIZER] = core.tokenizer
    app[SOURCE] = core.source
    # The edge: this front end's own (the endpoint picker leaves these to the gateway).
    app[LIMITER] = RateLimiter(settings, core.shared)
    app[GATE] = ConcurrencyGate(settings.max_concurrent)

    app.cleanup_ctx.append(_shared_index_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_monitor_ctx)

    app.router.add_post("/v1/completions", _inference(COMPLETIONS), name="completions")
    app.router.add_post("/v1/chat/completions", _inference(CHAT), name="chat")
    app.router.add_post("/v1/responses", _inference(RESPONSES), name="responses")
    app.router.add_post("/v1/embeddings", _inference(EMBEDDINGS), name="embeddings")
    # vLLM's scoring and tokenizer endpoints: routed on load to a worker of the model.
    for path, name in LOAD_ONLY_PATHS:
        app.router.add_post(path, _inference(LOAD_ONLY), name=name)
    app.router.add_get("/v1/models", models, name="models")
    app.router.add_get("/health", health, name="health")
    app.router.add_get("/ready", ready, name="ready")
    app.router.add_get("/metrics", metrics_handler, name="metrics")
    app.router.add_post("/debug/route", debug_route, name="debug")
    app.router.add_get("/openapi.json", openapi_handler, name="openapi")
    return app


# -- cleanup contexts: one per resource ------------------------------------------------------
async def _shared_index_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[SHARED].start()
    yield
    await app[TASKS].drain()  # releases still in flight go out before the client closes
    await app[SHARED].close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, keepalive_timeout=60)
    # auto_decompress off: bodies pass through byte for byte, Content-Encoding included.
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    app[SESSION] = session
    core = app[CORE]
    proxy = Proxy(s, core.pool, core.shared, core.metrics, session, core.tasks, core.lease)
    proxy.tracer = app[TRACER]
    proxy.propagate = recording(app[TRACER])
    app[PROXY] = proxy
    yield
    await app[TASKS].drain()
    await session.close()


async def _monitor_ctx(app: web.Application) -> AsyncIterator[None]:
    monitor = Monitor(
        app[SETTINGS],
        app[POOL],
        app[SHARED],
        app[SESSION],
        app[METRICS],
        app[SOURCE],
        feedback=app[PROXY].feedback,
    )
    app[MONITOR] = monitor
    monitor.start()
    probe = LoopLagProbe(app[METRICS])
    probe.start()
    yield
    await probe.close()
    await monitor.close()


# -- middleware ------------------------------------------------------------------------------
@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.name or "unknown"
    metrics = request.app[METRICS]
    try:
        resp = await handler(request)
    except APIError as exc:
        resp = exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.status
        err = APIError(
            code, exc.reason, type_="invalid_request_error" if code < 500 else "server_error"
        )
        if code == 404 and request.path.startswith("/v1/"):
            # An OpenAI path the router does not route: a clear answer, never a proxy to a
            # random worker.
            err = not_found(
                f"{request.path} is not an endpoint this router serves; it routes "
                "/v1/completions, /v1/chat/completions, /v1/responses, /v1/embeddings, "
                "/v1/score, /v1/rerank and /v1/models",
                code="unknown_endpoint",
            )
        resp = err.response()
    metrics.requests.labels(route, str(resp.status), request.get(_MODEL, "")).inc()
    return resp


# -- inference -------------------------------------------------------------------------------
async def _read_body(request: web.Request) -> bytes:
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise too_large(
            f"request body of {request.content_length} bytes exceeds the {limit}-byte limit"
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(f"request body exceeds the {limit}-byte limit") from None


def _priority(request: web.Request) -> str:
    """The request's priority: batch for an API key the settings mark so, else its header."""
    return request_priority(request.app[SETTINGS], request.headers)


LOAD_ONLY_PATHS = (
    ("/v1/score", "score"),
    ("/score", "score_root"),
    ("/v1/rerank", "rerank"),
    ("/rerank", "rerank_root"),
    ("/v2/rerank", "rerank_v2"),
    ("/tokenize", "tokenize"),
    ("/detokenize", "detokenize"),
)


def _inference(endpoint: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        app = request.app
        gate = app[GATE]
        # The bound comes first, before the body is read: a replica at its limit spends
        # nothing more on a request it refuses.
        if not gate.enter():
            app[METRICS].edge_refused.labels("overloaded").inc()
            raise overloaded(app[SETTINGS].retry_after_s)
        try:
            return await _admitted(request)
        finally:
            gate.leave()

    async def _admitted(request: web.Request) -> web.StreamResponse:
        app = request.app
        request[STARTED] = time.perf_counter()
        with app[TRACER].start_as_current_span(
            f"POST {request.path}",
            context=extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "url.path": request.path},
        ) as span:
            try:
                resp = await _route(request, span)
            except APIError as exc:
                span.set_attribute(ATTR_STATUS, exc.status)
                raise
            span.set_attribute(ATTR_STATUS, resp.status)
            return resp

    async def _route(request: web.Request, span: Any) -> web.StreamResponse:
        app = request.app
        m = app[METRICS]
        limiter = app[LIMITER]
        if limiter.enabled:
            wait = await limiter.take(client_key(request))
            if wait > 0:
                m.edge_refused.labels("rate_limited").inc()
                raise rate_limited(wait)
        core = app[CORE]
        raw = await _read_body(request)
        priority = _priority(request)

        def parsed(req: ParsedRequest) -> None:
            request[_MODEL] = req.model

        req, plan, ticket = await core.prepare(
            endpoint, raw, request.headers, priority=priority, on_parsed=parsed
        )
        try:
            return await _forward(request, span, raw, req, plan)
        finally:
            ticket.release()
            core.unreserve(req.model, plan)

    async def _forward(
        request: web.Request, span: Any, raw: bytes, req: ParsedRequest, plan: Plan
    ) -> web.StreamResponse:
        app = request.app
        d = plan.decision
        matched = app[CORE].count(endpoint, req, plan)
        span.set_attribute(ATTR_MODEL, req.model)
        span.set_attribute(ATTR_CHOSEN, d.worker)
        span.set_attribute(ATTR_REASON, d.reason)
        span.set_attribute(ATTR_MATCHED, matched)
        resp = await app[PROXY].forward(request, req, plan, raw)
        served = resp.headers.get(HEADER_WORKER)
        if served is not None:
            # After a retry the worker that answered is not the one the decision chose.
            span.set_attribute(ATTR_WORKER, served)
        return resp

    handle.__name__ = f"handle_{endpoint}"
    return handle


# -- operations ------------------------------------------------------------------------------
async def models(request: web.Request) -> web.Response:
    """The models the fleet serves right now: every model (adapters included, with their
    ``parent``) that a worker able to take requests serves, as vLLM lists them."""
    app = request.app
    router = app[ROUTER]
    cat = router.catalogue
    now = time.monotonic()
    up = [w for w in app[POOL].workers.values() if w.available(now)]
    placement = app[SETTINGS].lora_placement
    names: dict[str, str | None] = {}

    def add(name: str) -> None:
        r = router.resolve(name)
        if r is not None:  # a base model this router has no settings for is not served
            names.setdefault(name, r.base.name if r.lora_name else None)

    for w in up:
        if w.wildcard:
            for name in app[SETTINGS].models:
                add(name)
            continue
        for name in sorted(w.listed if w.listed is not None else w.models):
            add(name)
    if placement == "any_base_worker":
        for name, conf in cat.adapters.items():
            if conf.parent in names and names[conf.parent] is None:
                add(name)
    data = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "kvrouter",
            "root": parent or name,
            "parent": parent,
        }
        for name, parent in names.items()
    ]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 while some worker can take requests ("degraded" when the shared index
    is down: routing goes on by local load); 503 when no worker can."""
    app = request.app
    now = time.monotonic()
    pool = app[POOL]
    shared = app[SHARED]
    up = [w.id for w in pool.workers.values() if w.available(now)]
    redis = "disabled" if not shared.enabled else ("up" if shared.up else "down")
    if not up:
        status = "unavailable"
    elif redis == "down":
        status = "degraded"
    else:
        status = "ready"
    body = {
        "status": status,
        "redis": redis,
        "workers": {w.id: w.state(now) for w in pool.workers.values()},
        # Prefill/decode pools (available workers by role); "both" serves whole requests.
        "pools": pool.pools(now),
    }
    return web.json_response(body, status=200 if up else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    pools = request.app[POOL].pools(time.monotonic())
    gauge = request.app[METRICS].pool_workers
    for role, ids in pools.items():
        gauge.labels(role).set(len(ids))
    return web.Response(
        body=request.app[METRICS].render().encode(),
        headers={"Content-Type": CONTENT_TYPE, "X-Content-Type-Options": "nosniff"},
    )


async def openapi_handler(request: web.Request) -> web.Response:
    """The OpenAPI description of this API (router_node/openapi.py)."""
    from router_node.openapi import openapi_spec

    return web.json_response(openapi_spec())


def _check_admin(request: web.Request) -> None:
    token = request.app[SETTINGS].admin_token.get_secret_value()
    if not token:
        raise APIError(
            403, "debug endpoints are off: set KVR_ADMIN_TOKEN", type_="permission_error"
        )
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    # Constant-time comparison: the time taken says nothing about how much of it matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        value.strip().encode(), token.encode()
    ):
        raise unauthorized("a valid admin token is required as 'Authorization: Bearer <token>'")


async def debug_route(request: web.Request) -> web.Response:
    """Dry run of routing for a completions or chat body: no dispatch, no lease."""
    _check_admin(request)
    app = request.app
    settings = app[SETTINGS]
    raw = await _read_body(request)
    body = parse_body(raw)
    endpoint = CHAT if "messages" in body else COMPLETIONS
    if endpoint == COMPLETIONS and "prompt" not in body:
        raise bad_request("a completions body ('prompt') or a chat body ('messages') is required")
    req = parse_request(endpoint, body, request.headers, settings, app[ROUTER].resolve)
    tokenize(req, req.resolved.tokenizer if req.resolved is not None else None, settings)
    plan = await app[ROUTER].plan(req)
    bs = plan.block_size
    d = plan.decision
    workers = []
    for c in plan.candidates:
        workers.append(
            {
                "worker": c.worker,
                "depth_blocks": plan.depths.get(c.worker, 0),
                "matched_blocks": c.matched_blocks,
                "matched_tokens": c.matched_blocks * bs,
                "tier_blocks": plan.tier_depths.get(c.worker, {}),
                "tier_credit_blocks": c.tier_blocks,
                "load": {"requests": c.requests, "prefill_tokens": c.prefill_tokens},
                "cost": d.costs.get(c.worker),
                "guarded": c.worker in d.guarded,
            }
        )
    return web.json_response(
        {
            "model": req.model,
            "endpoint": endpoint,
            "tokens": len(req.token_ids or ()),
            "prompt_tokens": req.prompt_tokens,
            "blocks": len(plan.chain),
            "useful_blocks": plan.useful_blocks,
            "block_size": bs,
            "indexed": plan.indexed,
            "policy": d.policy,
            "reason": d.reason,
            "choice": d.worker,
            "ranking": list(d.ranking),
            "workers": workers,
            "token_ids": req.token_ids if body.get("return_token_ids") else None,
            "pd": _pd_view(plan),
        }
    )


def _pd_view(plan: Plan) -> dict[str, Any] | None:
    """The prefill/decode choice for /debug/route (None when the fleet is not split)."""
    pair = plan.pair
    if pair is None:
        return None
    return {
        "split": pair.split,
        "reason": pair.reason,
        "prefill": pair.prefill[0] if pair.prefill else None,
        "decode": pair.decode[0],
        "prefill_ranking": list(pair.prefill),
        "decode_ranking": list(pair.decode),
        "suffix_tokens": pair.suffix_tokens,
        "prefill_costs": dict(pair.prefill_costs),
        "decode_costs": dict(pair.costs),
    }


# -- running inside an event loop --------------------------------------------------------------
class RouterServer:
    """A router serving on ``host:port`` in the running event loop (port 0: any free port).

    ``async with RouterServer(settings) as server: ... server.url ...``
    """

    def __init__(
        self,
        settings: RouterSettings,
        *,
        tokenizer: PromptTokenizer | None = None,
        rng: random.Random | None = None,
        endpoint_source: EndpointSource | None = None,
        tracer_provider: Any | None = None,
    ) -> None:
        self.settings = settings
        self.app = create_app(
            settings,
            tokenizer=tokenizer,
            rng=rng,
            endpoint_source=endpoint_source,
            tracer_provider=tracer_provider,
        )
        self.runner = EdgeRunner(
            self.app, settings, self.app[METRICS], handler_cancellation=True, access_log=None
        )
        self.port = settings.port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        return f"http://{host}:{self.port}"

    async def start(self) -> RouterServer:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.host, self.settings.port)
        await site.start()
        sockets = [s for s in self.runner.addresses if isinstance(s, tuple)]
        if sockets:
            self.port = int(sockets[0][1])
        return self

    async def close(self) -> None:
        await self.runner.cleanup()

    async def __aenter__(self) -> RouterServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def settings_summary(settings: RouterSettings) -> dict[str, Any]:
    """Settings as a dict with secrets redacted (for the start-up log line)."""
    # The schema knows which fields are secrets, not a hand-kept list.
    return settings.summary()
