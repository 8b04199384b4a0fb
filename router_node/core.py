"""The routing core shared by the router's two front ends: the aiohttp proxy (`kvrouter serve`)
and the Envoy endpoint picker (`kvrouter epp`).

One `RoutingCore` holds what a decision needs (the worker pool, the shared index, the router,
the tokenizers, the metrics) and does the decision itself: parse the body, tokenize, look up,
score (`prepare`); the lease on the chosen worker (`lease`) is the same object for both front
ends. The front ends only differ in who carries the bytes: the proxy forwards them itself,
the endpoint picker names the worker and lets Envoy forward them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping

from kvrouter.discovery.base import EndpointSource
from router_node.metrics import Metrics
from router_node.proxy import BackgroundTasks, Lease
from router_node.request import (
    ParsedRequest,
    PromptTokenizer,
    parse_body,
    parse_request,
    tokenize,
)
from router_node.routing import Plan, Router
from router_node.settings import RouterSettings, kubernetes_source
from router_node.shared_index import SharedIndex
from router_node.workers import Worker, WorkerPool


def load_tokenizer(path: str, chat_template: str = "") -> PromptTokenizer:
    """Load a tokenizer.json or a model directory (raises TokenizerLoadError); a
    `chat_template` file replaces the directory's default template."""
    from kvrouter.tokenizer import Tokenizer

    if not chat_template:
        return Tokenizer.load(path)
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
    return Tokenizer(replace(files, chat_templates=templates, chat_template_origin=origin))


class RoutingCore:
    """Everything one routing decision needs, built once per process from the settings.

    Loads the tokenizer from ``settings.tokenizer`` unless one is given (so a bad tokenizer
    path fails at start-up). With ``discovery=kubernetes`` it builds the EndpointSlice watch
    unless `endpoint_source` is given (tests, embedding, an InferencePool watch).
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
        self.metrics = Metrics()
        self.pool = WorkerPool(settings)
        self.shared = SharedIndex(settings, self.metrics)
        self.router = Router(settings, self.pool, self.shared, self.metrics, rng)
        self.tasks = BackgroundTasks()
        if tokenizer is None and settings.tokenizer:
            tokenizer = load_tokenizer(settings.tokenizer)
        self.tokenizer = tokenizer
        # One tokenizer per distinct (path, template): models sharing files share the cache.
        loaded: dict[tuple[str, str], PromptTokenizer | None] = {
            (settings.tokenizer, ""): tokenizer
        }
        per_model: dict[str, PromptTokenizer | None] = {}
        for name, base in self.router.catalogue.bases.items():
            key = (base.tokenizer, base.chat_template)
            if key not in loaded:
                loaded[key] = load_tokenizer(*key) if base.tokenizer else None
            per_model[name] = loaded[key]
        self.tokenizers = per_model
        """Tokenizer per base model (an adapter uses its base model's)."""
        if endpoint_source is None and settings.discovery == "kubernetes":
            endpoint_source = kubernetes_source(settings)
        self.source = endpoint_source
        if tokenizer is not None and hasattr(tokenizer, "cache_stats"):
            stats = tokenizer.cache_stats

            def collect() -> list[tuple[str, float]]:
                s = stats()
                return [(k, float(getattr(s, k))) for k in ("hits", "misses", "entries", "tokens")]

            self.metrics.tokenizer_cache.source = collect

    def tokenizer_for(self, model: str) -> PromptTokenizer | None:
        resolved = self.router.resolve(model)
        if resolved is None:
            return self.tokenizer
        return self.tokenizers.get(resolved.base.name, self.tokenizer)

    async def prepare(
        self,
        endpoint: str,
        raw: bytes,
        headers: Mapping[str, str],
        *,
        allowed: frozenset[str] | None = None,
        on_parsed: Callable[[ParsedRequest], None] | None = None,
    ) -> tuple[ParsedRequest, Plan]:
        """Parse, tokenize, look up and score one request body: the routing decision.

        Raises APIError (400 malformed, 404 unknown model, 413 too large, 503 when no worker
        can take it). `allowed` restricts the candidates to workers whose address
        (``host:port``) it names (the endpoint picker's subset hint). `on_parsed` sees the
        request once its fields are checked (the proxy labels its metrics with the model).
        """
        settings = self.settings
        body = parse_body(raw)
        req = parse_request(endpoint, body, headers, settings, self.router.knows)
        if on_parsed is not None:
            on_parsed(req)
        tok = self.tokenizer_for(req.model)
        start = time.perf_counter()
        if len(raw) > settings.tokenize_thread_bytes:
            # Long prompts are the router's main CPU cost; a thread keeps the loop serving
            # others (tokenizers releases the GIL while it encodes).
            await asyncio.to_thread(tokenize, req, tok, settings)
        else:
            tokenize(req, tok, settings)
        self.metrics.tokenize_seconds.observe(time.perf_counter() - start)
        plan = await self.router.plan(req, allowed=allowed)
        return req, plan

    def count(self, req: ParsedRequest, plan: Plan) -> None:
        """Decision metrics for a request about to be sent to its plan's workers."""
        m = self.metrics
        d = plan.decision
        m.decisions.labels(d.policy, d.reason, req.model).inc()
        matched = plan.matched_tokens(d.worker)
        m.matched_tokens.labels(req.model).observe(matched)
        m.matched_tokens_total.inc(req.model, matched)
        m.prompt_tokens_total.labels(req.model).inc(req.prompt_tokens)

    def lease(self, req: ParsedRequest, plan: Plan, worker: Worker) -> Lease:
        """Round trip 2 for `worker`: speculative residency of the prompt's chain and an
        in-flight lease, started in the background (see `Lease`)."""
        bs = plan.block_size
        held = plan.depths.get(worker.id, 0)
        prefill = max(0, plan.prompt_tokens - plan.matched_tokens(worker.id, bs))
        shared = self.shared

        async def dispatch(lease_id: str) -> bool:
            return await shared.dispatch(
                req.model,
                worker.id,
                plan.chain,
                held=held,
                capacity=worker.capacity_blocks,
                lease_id=lease_id,
                prefill_tokens=prefill,
            )

        # This replica's own view of the worker's prefill queue, current at once; the shared
        # view in Redis lags by the dispatch round trip (see Router.plan).
        worker.prefill_pending += prefill

        def prefilled() -> None:
            worker.prefill_pending -= prefill

        return Lease(self.shared, self.tasks, req.model, worker.id, prefill, dispatch, prefilled)
