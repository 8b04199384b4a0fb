"""The routing core shared by the router's two front ends: the aiohttp proxy (`kvrouter serve`)
and the Envoy endpoint picker (`kvrouter epp`).

One `RoutingCore` holds what a decision needs (the worker pool, the shared index, the router,
the tokenizers, priority admission, the tracer, the metrics) and does the decision itself:
parse the body, tokenize, take an admission slot, look up, score (`prepare`); the lease on the
chosen worker (`lease`) is the same object for both front ends. The front ends only differ in
who carries the bytes (the proxy forwards them itself, the endpoint picker names the worker
and lets Envoy forward them) and in what they do at their edge (the proxy's concurrency gate,
rate limiter, priority header and server span stay in router_node/app.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from kvrouter.discovery.base import EndpointSource
from router_node.admission import BATCH, INTERACTIVE, Admission, QueueFull, Ticket
from router_node.edge import overloaded
from router_node.errors import bad_request
from router_node.metrics import Metrics
from router_node.proxy import BackgroundTasks, Lease
from router_node.request import ParsedRequest, PromptTokenizer, parse_body, parse_request, tokenize
from router_node.routing import Plan, Router
from router_node.settings import RouterSettings, kubernetes_source
from router_node.shared_index import SharedIndex
from router_node.tracing import ATTR_PROMPT, ATTR_WORKER, get_tracer
from router_node.workers import Worker, WorkerPool


def load_tokenizer(
    path: str, chat_template: str = "", content_format: str = "auto"
) -> PromptTokenizer:
    """Load a tokenizer.json or a model directory (raises TokenizerLoadError); a
    `chat_template` file replaces the directory's default template; `content_format`
    overrides the detected chat template content format."""
    from kvrouter.tokenizer import Tokenizer

    if not chat_template:
        return Tokenizer.load(path, content_format=content_format)
    from dataclasses import replace
    from pathlib import Path

    from kvrouter.tokenizer.errors import TokenizerLoadError
    from kvrouter.tokenizer.loading import read_tokenizer_files

    files = read_tokenizer_files(path)
    try:
        text = Path(chat_template).read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenizerLoadError(Path(chat_template), f"cannot read: {exc.strerror}") from None
    templates = {**files.chat_templates, "default": text}
    origin = Path(chat_template)
    return Tokenizer(
        replace(files, chat_templates=templates, chat_template_origin=origin),
        content_format=content_format,
    )


def request_priority(settings: RouterSettings, headers: Mapping[str, str]) -> str:
    """A request's priority: batch for an API key the settings mark so, else its priority
    header (``interactive`` when absent); 400 for any other value."""
    if settings.batch_key_digests:
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() == "bearer" and digest in settings.batch_key_digests:
            return BATCH
    given = headers.get(settings.priority_header, "").strip().lower()
    if given in ("", INTERACTIVE):
        return INTERACTIVE
    if given == BATCH:
        return BATCH
    raise bad_request(
        f"{settings.priority_header} must be 'interactive' or 'batch'", param="priority"
    )


class RoutingCore:
    """Everything one routing decision needs, built once per process from the settings.

    Loads the tokenizer from ``settings.tokenizer`` unless one is given (so a bad tokenizer
    path fails at start-up). With ``discovery=kubernetes`` it builds the endpoint watch
    unless `endpoint_source` is given (tests, embedding). Spans go to `tracer_provider`, else
    to the global one (router_node/tracing.py).
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
        self.metrics = Metrics()
        self.pool = WorkerPool(settings)
        self.shared = SharedIndex(settings, self.metrics)
        self.router = router = Router(settings, self.pool, self.shared, self.metrics, rng)
        self.tracer = get_tracer(tracer_provider)
        router.tracer = self.tracer
        self.tasks = BackgroundTasks()

        def workers_for(model: str) -> int:
            resolved = router.resolve(model)
            if resolved is None:
                return 0
            now = time.monotonic()
            return len(router.pool.candidates_for(resolved.resolved, settings.lora_placement, now))

        self.admission = Admission(
            settings.worker_max_inflight,
            settings.batch_share,
            settings.priority_queue_max,
            workers_for,
        )
        if tokenizer is None and settings.tokenizer:
            tokenizer = load_tokenizer(settings.tokenizer)
        self.tokenizer = tokenizer
        # One tokenizer per distinct (path, template): models sharing files share the cache.
        loaded: dict[tuple[str, str, str], PromptTokenizer | None] = {
            (settings.tokenizer, "", "auto"): tokenizer
        }
        for name, base in router.catalogue.bases.items():
            key = (base.tokenizer, base.chat_template, base.content_format)
            if key not in loaded:
                loaded[key] = load_tokenizer(*key) if base.tokenizer else None
            # the router's resolved models carry these (Router.resolve)
            router.tokenizers[name] = loaded[key]
        if endpoint_source is None and settings.discovery == "kubernetes":
            endpoint_source = kubernetes_source(settings)
        self.source = endpoint_source
        if tokenizer is not None and hasattr(tokenizer, "cache_stats"):
            stats = tokenizer.cache_stats

            def collect() -> list[tuple[str, float]]:
                s = stats()
                return [(k, float(getattr(s, k))) for k in ("hits", "misses", "entries", "tokens")]

            self.metrics.tokenizer_cache.source = collect

    async def prepare(
        self,
        endpoint: str,
        raw: bytes,
        headers: Mapping[str, str],
        *,
        priority: str,
        allowed: frozenset[str] | None = None,
        on_parsed: Callable[[ParsedRequest], None] | None = None,
    ) -> tuple[ParsedRequest, Plan, Ticket]:
        """Parse, tokenize, admit and score one request body: the routing decision.

        Raises APIError (400 malformed, 404 unknown model, 413 too large, 503 when no worker
        can take it or the priority queue is full). The returned ticket holds the request's
        admission slot: the caller releases it when the response ends. `allowed` restricts
        the candidates to workers whose address (``host:port``) it names (the endpoint
        picker's subset hint). `on_parsed` sees the request once its fields are checked (the
        proxy labels its metrics with the model).
        """
        settings = self.settings
        tracer = self.tracer
        with tracer.start_as_current_span("parse") as span:
            body = parse_body(raw)
            req = parse_request(endpoint, body, headers, settings, self.router.resolve)
            if on_parsed is not None:
                on_parsed(req)
            span.set_attribute("kvrouter.body_bytes", len(raw))
        tok = req.resolved.tokenizer if req.resolved is not None else None
        start = time.perf_counter()
        with tracer.start_as_current_span("tokenize") as span:
            if len(raw) > settings.tokenize_thread_bytes:
                # Long prompts are the router's main CPU cost; a thread keeps the loop serving
                # others (tokenizers releases the GIL while it encodes).
                await asyncio.to_thread(tokenize, req, tok, settings)
            else:
                tokenize(req, tok, settings)
            span.set_attribute(ATTR_PROMPT, req.prompt_tokens)
        self.metrics.tokenize_seconds.observe(time.perf_counter() - start)
        ticket = await self.admit(req.model, priority)
        try:
            plan = await self.router.plan(req, allowed=allowed)
            await self.router.recheck(req, plan)
        except BaseException:
            ticket.release()
            raise
        return req, plan, ticket

    async def admit(self, model: str, priority: str) -> Ticket:
        """A slot for a request of `model` under priority admission (router_node/admission.py);
        503 with Retry-After when the queue is full."""
        admission = self.admission
        if not admission.enabled:
            return Ticket(None, model, priority)
        with self.tracer.start_as_current_span("queue") as span:
            span.set_attribute("kvrouter.priority", priority)
            try:
                return await admission.admit(model, priority)
            except QueueFull:
                self.metrics.edge_refused.labels("queue_full").inc()
                raise overloaded(self.settings.retry_after_s) from None

    def count(self, endpoint: str, req: ParsedRequest, plan: Plan) -> int:
        """Decision metrics for a request about to be sent to its plan's workers; returns the
        chosen worker's matched tokens."""
        m = self.metrics
        d = plan.decision
        m.decisions.labels(d.policy, d.reason, req.model).inc()
        if plan.pair is not None:
            m.pd_decisions.labels(plan.pair.reason).inc()
        if req.inexact is not None:
            m.tokenization_inexact.labels(endpoint, req.inexact).inc()
        matched = plan.matched_tokens(d.worker)
        m.matched_tokens.labels(req.model).observe(matched)
        m.matched_tokens_total.inc(req.model, matched)
        m.prompt_tokens_total.labels(req.model).inc(req.prompt_tokens)
        return matched

    def lease(
        self, req: ParsedRequest, plan: Plan, worker: Worker, prefill: int | None = None
    ) -> Lease:
        """Round trip 2 for `worker`: speculative residency of the prompt's chain and an
        in-flight lease, started in the background (see `Lease`). `prefill` overrides the
        prompt tokens it counts (0 for a decode leg: the prefill ran elsewhere)."""
        held = plan.depths.get(worker.id, 0)
        if prefill is None:
            prefill = plan.prefill_for(worker.id)
        # The re-check's reservation (Router.recheck) is this lease when it names this worker
        # and prefill: the dispatch takes it again with the full ttl, which adopts it.
        res = plan.reserved
        lease_id = None
        if res is not None and res.worker == worker.id and res.prefill_tokens == prefill:
            plan.reserved = None
            lease_id = res.lease_id
        shared = self.shared
        tracer = self.tracer

        async def dispatch(lease_id: str) -> bool:
            # A task started inside the attempt's span: this span is the attempt's child.
            with tracer.start_as_current_span("record_lease") as span:
                ok = await shared.dispatch(
                    req.model,
                    worker.id,
                    plan.chain,
                    held=held,
                    capacity=worker.capacity_blocks,
                    lease_id=lease_id,
                    prefill_tokens=prefill,
                )
                span.set_attribute(ATTR_WORKER, worker.id)
                span.set_attribute("kvrouter.record.blocks", len(plan.chain))
                span.set_attribute("kvrouter.lease.taken", ok)
                return ok

        # This replica's own view of the worker's prefill queue, current at once; the shared
        # view in Redis lags by the dispatch round trip (see Router.plan).
        worker.prefill_pending += prefill

        def prefilled() -> None:
            worker.prefill_pending -= prefill

        return Lease(
            shared, self.tasks, req.model, worker.id, prefill, dispatch, prefilled, lease_id
        )

    def unreserve(self, model: str, plan: Plan) -> None:
        """Give back a re-check's reservation no lease adopted (the request ended or went to
        another worker first); it would otherwise count until its short ttl runs out."""
        res, plan.reserved = plan.reserved, None
        if res is not None:
            self.tasks.spawn(
                self.shared.release(
                    model, res.worker, res.lease_id, res.prefill_tokens, prefilled_only=False
                )
            )
