"""Forwarding a routed request to its worker: retries, SSE pass-through, leases, cancellation.

For each worker of the plan's ranking (at most ``max_attempts``):

1. Start round trip 2 (speculative residency + in-flight lease) as a task, concurrently with
   the upstream request, so Redis adds no latency of its own here. The response does not
   wait for it: the record lands within about one Redis round trip of dispatch, long before
   any real completion ends (a request that reaches a router inside that window routes as
   if this one had not been sent yet, as concurrent requests always do).
2. Send the body exactly as received. A connect error, a timeout, a 502/503/504, or an
   upstream that dies before its first body byte is a failure *before the first byte*: the
   worker's circuit breaker counts it and the next-best worker is tried.
3. Non-streaming responses are read whole and returned with the upstream status. Streaming
   (``text/event-stream``) responses are written through chunk by chunk, untouched. If the
   upstream fails after bytes reached the client, the stream is ended with an OpenAI-style
   error event (then ``[DONE]``, as vLLM does).
4. If the client goes away, the upstream connection is closed (not returned to the pool), so
   the engine aborts the request and frees its KV blocks. With aiohttp's handler
   cancellation on (the router's server runs with it), a non-streaming handler is cancelled
   the same way.

Leases are released in the background: the prefill part at the first streamed byte, the rest
when the response is done (or failed, or was cancelled).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.trace import SpanKind, Status, StatusCode

from router_node.errors import (
    APIError,
    error_event_in,
    error_event_status,
    not_found,
    sse_error_event,
    unavailable,
)
from router_node.feedback import Feedback, connection_refused
from router_node.metrics import Metrics
from router_node.request import CHAT, COMPLETIONS, ParsedRequest
from router_node.routing import Plan, new_lease_id
from router_node.settings import RouterSettings
from router_node.shared_index import SharedIndex
from router_node.tracing import (
    ATTR_ATTEMPT,
    ATTR_LEG,
    ATTR_STATUS,
    ATTR_WORKER,
    get_tracer,
    inject,
)
from router_node.workers import Worker, WorkerPool

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({502, 503, 504})

# Request headers passed to the worker; everything else (hop-by-hop, Host, Content-Length)
# is the router's own business.
FORWARD_REQUEST = (
    "authorization",
    "accept",
    "user-agent",
    "x-request-id",
    "traceparent",
    "openai-organization",
)
# Response headers passed back to the client.
FORWARD_RESPONSE = ("content-type", "content-encoding", "cache-control", "x-request-id")
UPSTREAM_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)

STARTED = web.RequestKey("kvrouter_started", float)
"""When the router received the request (``time.perf_counter()``), set by the app."""
# usage.prompt_tokens (chat, completions, embeddings) or usage.input_tokens (responses).
_USAGE_PROMPT = re.compile(rb'"(?:prompt_tokens|input_tokens)"\s*:\s*(\d+)\s*[,}]')
# Mismatches logged per model and process: enough to see the model and endpoint at once,
# bounded so a wrong tokenizer does not flood the log (the metric counts them all).
MISMATCH_LOG_LIMIT = 5

# Endpoints whose 404 means "this worker does not serve the model" (elsewhere a 404 can be
# the endpoint's own answer, such as an unknown previous response: passed through).
MODEL_404 = frozenset({CHAT, COMPLETIONS})

HEADER_WORKER = "x-kvrouter-worker"
HEADER_MATCHED = "x-kvrouter-matched-tokens"
HEADER_PREFILL = "x-kvrouter-prefill-worker"
"""On a split request: the worker that ran the prefill leg (absent when none did)."""

# The prefill leg's kv_transfer_params (vLLM NixlConnector, as its toy proxy and llm-d's
# sidecar send them; docs/disaggregation.md).
PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
# Fields a decode worker needs from the prefill answer to pull the KV cache; without them it
# logs "invalid KVTransferParams" and recomputes the prompt, so the router does not forward
# such params (the request runs whole on the decode worker instead, counted).
REQUIRED_PARAMS = ("remote_engine_id", "remote_host", "remote_port", "remote_block_ids")


class ParamsError(ValueError):
    """A prefill answer's kv_transfer_params are missing (`cause` missing_params) or cannot be
    used (malformed_params)."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg's body: the client's, asking for one token, not streamed, with
    ``do_remote_decode`` so the worker keeps the KV blocks for the decode worker."""
    out = dict(body)
    out["kv_transfer_params"] = dict(PREFILL_PARAMS)
    out["stream"] = False
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    # One token exactly: a minimum above 1 would contradict max_tokens; no stream, no options.
    for key in ("stream_options", "min_tokens", "min_completion_tokens"):
        out.pop(key, None)
    return out


def transfer_params(answer: Any) -> dict[str, Any]:
    """The usable kv_transfer_params of a prefill answer (a decoded JSON body); raises
    ParamsError when they are absent or malformed."""
    if not isinstance(answer, dict):
        raise ParamsError("malformed_params", "the prefill answer is not a JSON object")
    params = answer.get("kv_transfer_params")
    if params is None:
        raise ParamsError("missing_params", "the prefill answer has no kv_transfer_params")
    if not isinstance(params, dict):
        raise ParamsError("malformed_params", "kv_transfer_params is not an object")
    missing = [k for k in REQUIRED_PARAMS if params.get(k) is None]
    if missing:
        raise ParamsError("malformed_params", f"kv_transfer_params lacks {', '.join(missing)}")
    port, blocks = params["remote_port"], params["remote_block_ids"]
    if not isinstance(params["remote_host"], str) or not params["remote_host"]:
        raise ParamsError("malformed_params", "remote_host is not a host name")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ParamsError("malformed_params", "remote_port is not a TCP port")
    if not isinstance(blocks, list) or not all(
        isinstance(b, int) and not isinstance(b, bool) for b in blocks
    ):
        raise ParamsError("malformed_params", "remote_block_ids is not a list of block ids")
    return params


class BackgroundTasks:
    """Tasks the router starts and must not lose (lease releases); drained at shutdown."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def drain(self, limit_s: float = 5.0) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=limit_s)


class Lease:
    """One request's hold on one worker: the dispatch round trip and its releases, in order."""

    def __init__(
        self,
        shared: SharedIndex,
        tasks: BackgroundTasks,
        model: str,
        worker: str,
        prefill_tokens: int,
        dispatch: Callable[[str], Coroutine[Any, Any, bool]],
        on_prefilled: Callable[[], None] | None = None,
        lease_id: str | None = None,
    ) -> None:
        self.shared = shared
        self._on_prefilled = on_prefilled
        self.tasks = tasks
        self.model = model
        self.worker = worker
        self.prefill_tokens = prefill_tokens
        self.id = lease_id or new_lease_id()
        self._taken: asyncio.Task[bool] = tasks.spawn(dispatch(self.id))
        self._release: asyncio.Task[None] | None = None
        self._prefilled = False
        self._ended = False

    def _then(self, prefilled_only: bool) -> None:
        taken, prev = self._taken, self._release
        # After a "prefilled" release the lease holds 0 prefill tokens (its member is
        # rewritten as <worker>|<id>|0), so the final release must name 0 to find it.
        tokens = 0 if (self._prefilled and not prefilled_only) else self.prefill_tokens

        async def step() -> None:
            if prev is not None:
                await asyncio.wait([prev])  # the prefill release goes first
            try:
                ok = await taken
            except Exception:
                return
            if ok:  # False: no lease was taken (Redis down), nothing to give back
                await self.shared.release(
                    self.model,
                    self.worker,
                    self.id,
                    tokens,
                    prefilled_only=prefilled_only,
                )

        self._release = self.tasks.spawn(step())

    @property
    def recorded(self) -> asyncio.Task[bool]:
        """The dispatch round trip (the records and the lease): a correction of this attempt's
        records waits for it, or the records could land after the correction and outlive it."""
        return self._taken

    def _local_prefill_done(self) -> None:
        cb, self._on_prefilled = self._on_prefilled, None
        if cb is not None:
            cb()

    def first_byte(self) -> None:
        self._local_prefill_done()
        if not self._prefilled and not self._ended:
            self._prefilled = True
            self._then(prefilled_only=True)

    def end(self) -> None:
        self._local_prefill_done()
        if not self._ended:
            self._ended = True
            self._then(prefilled_only=False)


class LeaseTaker(Protocol):
    """Takes the lease on a worker for a request (`RoutingCore.lease`)."""

    def __call__(
        self, req: ParsedRequest, plan: Plan, worker: Worker, prefill: int | None = None
    ) -> Lease: ...


class Proxy:
    def __init__(
        self,
        settings: RouterSettings,
        pool: WorkerPool,
        shared: SharedIndex,
        metrics: Metrics,
        session: aiohttp.ClientSession,
        tasks: BackgroundTasks,
        lease: LeaseTaker,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.shared = shared
        self.metrics = metrics
        self.session = session
        self.tasks = tasks
        self._lease = lease
        """Takes the lease on a worker (RoutingCore.lease: the same for both front ends)."""
        self.feedback = Feedback(settings, shared, metrics, tasks.spawn, pool.get)
        self._mismatches_logged: dict[str, int] = {}
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout_s,
            sock_read=settings.read_timeout_s,
        )
        self.tracer = get_tracer()
        self.propagate = False
        """Write our attempt span's ``traceparent`` to the worker (only when spans are
        recorded: otherwise the client's own passes through untouched)."""

    def _headers(self, request: web.Request, worker: Worker) -> dict[str, str]:
        h = {k: v for k in FORWARD_REQUEST if (v := request.headers.get(k)) is not None}
        h["Content-Type"] = "application/json"
        h.update(worker.headers)
        if self.propagate:
            inject(h)
        return h

    async def forward(
        self, request: web.Request, req: ParsedRequest, plan: Plan, raw: bytes
    ) -> web.StreamResponse:
        """Send the request to the plan's workers in order until one answers (a split P/D
        request: its prefill leg first, then the decode leg)."""
        if plan.pair is not None and plan.pair.split:
            return await self._forward_pd(request, req, plan, raw)
        return await self._forward(request, req, plan, raw, plan.decision.ranking)

    async def _forward_pd(
        self, request: web.Request, req: ParsedRequest, plan: Plan, raw: bytes
    ) -> web.StreamResponse:
        assert plan.pair is not None
        # One request id for both legs: vLLM's connectors and llm-d's sidecar match the legs
        # (and their logs) by it.
        rid = request.headers.get("x-request-id") or str(uuid.uuid4())
        params: dict[str, Any] | None = None
        prefill_worker: Worker | None = None
        try:
            params, prefill_worker = await self._prefill_leg(request, req, plan, rid)
        except ParamsError as exc:
            log.warning("P/D request %s runs whole on the decode worker: %s", rid, exc)
            self.metrics.pd_fallbacks.labels(exc.cause).inc()
        if params is None:
            # Whole on the decode pool: it prefills itself (its lease counts the prompt).
            return await self._forward(request, req, plan, raw, plan.pair.decode, request_id=rid)
        body = dict(req.body)
        body["kv_transfer_params"] = params
        return await self._forward(
            request,
            req,
            plan,
            orjson.dumps(body),
            plan.pair.decode,
            request_id=rid,
            decode_leg=True,
            prefill_worker=prefill_worker,
        )

    async def _prefill_leg(
        self, request: web.Request, req: ParsedRequest, plan: Plan, rid: str
    ) -> tuple[dict[str, Any] | None, Worker | None]:
        """Run the prefill leg on the prefill ranking until a worker answers. Returns the
        transfer params and that worker; (None, None) when every prefill worker failed (the
        caller runs the request whole). Raises ParamsError for an answer without usable
        params. A cancelled handler (the client left) closes the prefill connection, so the
        prefill worker aborts and frees its blocks."""
        assert plan.pair is not None
        data = orjson.dumps(prefill_body(req.body))
        attempts = 0
        for wid in plan.pair.prefill:
            if attempts >= self.settings.max_attempts:
                break
            worker = self.pool.get(wid)
            if worker is None or not worker.available(time.monotonic()):
                continue
            attempts += 1
            if attempts > 1:
                self.metrics.retries.inc()
            # One span per prefill attempt, like the decode leg's `attempt` spans; the worker
            # gets a traceparent naming it, so vLLM's prefill spans continue under it.
            attrs: dict[str, str | int] = {
                ATTR_WORKER: worker.id, ATTR_ATTEMPT: attempts, ATTR_LEG: "prefill"
            }  # fmt: skip
            with self.tracer.start_as_current_span(
                "prefill", kind=SpanKind.CLIENT, attributes=attrs
            ) as span:
                headers = self._headers(request, worker)
                headers["X-Request-Id"] = rid
                lease = self._lease(req, plan, worker)
                racing = self.feedback.dispatched(req.model, worker.id, plan)
                worker.inflight += 1
                resp: aiohttp.ClientResponse | None = None
                try:
                    try:
                        resp = await self.session.post(
                            f"{worker.url}{request.path}",
                            data=data,
                            headers=headers,
                            timeout=self.timeout,
                        )
                        self.feedback.answered(worker.id)
                        answer = await resp.read()
                    except UPSTREAM_ERRORS as exc:
                        detail = f"{type(exc).__name__}: {exc}"
                        self._unanswered(
                            req, plan, worker, lease, racing, "prefill", detail, exc=exc
                        )
                        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                        continue
                    self.metrics.worker_requests.labels(worker.id).inc()
                    span.set_attribute(ATTR_STATUS, resp.status)
                    if resp.status != 200:
                        span.set_status(Status(StatusCode.ERROR, f"HTTP {resp.status}"))
                        if resp.status >= 500 or resp.status in RETRY_STATUSES:
                            detail = f"HTTP {resp.status}"
                            self._unanswered(req, plan, worker, lease, racing, "prefill", detail)
                        else:
                            self.metrics.upstream_errors.labels(worker.id, "prefill").inc()
                        continue
                    self.pool.record_success(worker)
                    # The prefill worker's own cache served this prefill: its feedback counts.
                    self.feedback.observe_body(req.model, worker.id, plan, answer, racing)
                    try:
                        decoded = orjson.loads(answer)
                    except orjson.JSONDecodeError:
                        raise ParamsError(
                            "malformed_params", "the prefill answer is not JSON"
                        ) from None
                    return transfer_params(decoded), worker
                except asyncio.CancelledError:
                    self.metrics.pd_prefill_cancelled.inc()
                    raise
                finally:
                    worker.inflight -= 1
                    lease.end()
                    self.feedback.finished(req.model, worker.id, plan)
                    if resp is not None:
                        if resp.content.is_eof():
                            resp.release()
                        else:
                            resp.close()
        self.metrics.pd_fallbacks.labels("prefill_failed").inc()
        log.warning("P/D request %s: no prefill worker answered; running it whole", rid)
        return None, None

    async def _forward(
        self,
        request: web.Request,
        req: ParsedRequest,
        plan: Plan,
        raw: bytes,
        ranking: tuple[str, ...],
        *,
        request_id: str | None = None,
        decode_leg: bool = False,
        prefill_worker: Worker | None = None,
    ) -> web.StreamResponse:
        last_error: APIError | None = None
        attempts = 0
        for wid in ranking:
            if attempts >= self.settings.max_attempts:
                break
            worker = self.pool.get(wid)
            if worker is None or not worker.available(time.monotonic()):
                continue
            attempts += 1
            if attempts > 1:
                self.metrics.retries.inc()
            outcome = await self._traced_attempt(
                request,
                req,
                plan,
                raw,
                worker,
                attempts,
                request_id=request_id,
                decode_leg=decode_leg,
                prefill_worker=prefill_worker,
            )
            if isinstance(outcome, web.StreamResponse):
                return outcome
            last_error = outcome
        if last_error is not None and last_error.status == 404:
            raise last_error  # every worker tried said it does not serve the model
        detail = f": {last_error.message}" if last_error is not None else ""
        raise unavailable(
            f"no worker could take the request ({attempts} tried){detail}",
            self.settings.retry_after_s,
        )

    def _first_byte(self, request: web.Request, model: str) -> None:
        started = request.get(STARTED)
        if started is not None:
            self.metrics.first_byte_seconds.labels(model).observe(time.perf_counter() - started)

    def check_prompt_tokens(self, req: ParsedRequest, worker: Worker, data: bytes) -> bool:
        """Compare the prompt token count a worker reports in `data` (a response body or
        the tail of a stream) with the router's own; count and log a difference. Returns
        True once a count was found (so a stream stops looking)."""
        found = _USAGE_PROMPT.search(data)
        if found is None:
            return False
        reported = int(found.group(1))
        self.metrics.tokenization_checked.labels(req.model).inc()
        if reported != req.prompt_tokens:
            self.metrics.tokenization_mismatch.labels(req.model).inc()
            logged = self._mismatches_logged.get(req.model, 0)
            if logged < MISMATCH_LOG_LIMIT:
                self._mismatches_logged[req.model] = logged + 1
                log.warning(
                    "tokenization mismatch: model %s, endpoint %s, worker %s reports %d prompt "
                    "tokens, the router counted %d: its tokenizer or chat template differs "
                    "from the engine's, so its block keys miss the engine's cache%s",
                    req.model,
                    req.endpoint,
                    worker.id,
                    reported,
                    req.prompt_tokens,
                    " (further mismatches of this model are only counted)"
                    if logged + 1 == MISMATCH_LOG_LIMIT
                    else "",
                )
        return True

    def _fail(self, worker: Worker, kind: str, detail: str) -> APIError:
        self.metrics.upstream_errors.labels(worker.id, kind).inc()
        if self.pool.record_failure(worker, time.monotonic()):
            self.metrics.ejections.labels(worker.id).inc()
            log.warning("worker %s ejected after %s failures (%s)", worker.id, kind, detail)
        return APIError(
            502,
            f"worker {worker.id} failed: {detail}",
            type_="upstream_error",
            code="upstream_error",
        )

    def _unanswered(
        self,
        req: ParsedRequest,
        plan: Plan,
        worker: Worker,
        lease: Lease,
        racing: int,
        kind: str,
        detail: str,
        exc: BaseException | None = None,
    ) -> APIError:
        """`_fail` for a failure before any answer (refused, reset, a retryable status, an
        empty stream or one that opens with an error): the engine never computed the prompt,
        so feedback also drops what the attempt's dispatch recorded there (once it landed).
        A refused connection (`exc`) is an outage: feedback drops the worker's records."""
        self.feedback.unanswered(req.model, worker.id, plan, racing, after=lease.recorded)
        if exc is not None and connection_refused(exc):
            self.feedback.refused(worker.id, (req.model, plan), after=lease.recorded)
        return self._fail(worker, kind, detail)

    def _aborted_in(
        self, req: ParsedRequest, plan: Plan, worker: Worker, lease: Lease, data: bytes
    ) -> bool:
        """Whether `data`, a piece of a running stream, has an error event with a 5xx code:
        the engine aborted the request, as it does when it restarts (feedback.py)."""
        status = error_event_in(data)
        if status is None or status < 500:
            return False
        self.feedback.aborted(req.model, worker.id, plan, after=lease.recorded)
        return True

    def _response_headers(
        self,
        resp: aiohttp.ClientResponse,
        plan: Plan,
        worker: Worker,
        prefill_worker: Worker | None = None,
    ) -> CIMultiDict[str]:
        h: CIMultiDict[str] = CIMultiDict()
        for k in FORWARD_RESPONSE:
            v = resp.headers.get(k)
            if v is not None:
                h[k] = v
        h[HEADER_WORKER] = worker.id
        h[HEADER_MATCHED] = str(plan.matched_tokens(worker.id))
        if prefill_worker is not None:
            h[HEADER_PREFILL] = prefill_worker.id
        return h

    async def _load_adapter(self, worker: Worker, name: str, path: str) -> APIError | None:
        """Ask a worker of the base model to load a LoRA adapter (vLLM's runtime LoRA API,
        ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); a failure moves on to the next worker."""
        body = {"lora_name": name, "lora_path": path}
        try:
            async with self.session.post(
                f"{worker.url}/v1/load_lora_adapter",
                json=body,
                headers=dict(worker.headers),
                timeout=self.timeout,
            ) as resp:
                text = await resp.text()
        except UPSTREAM_ERRORS as exc:
            return self._fail(worker, "lora_load", f"{type(exc).__name__}: {exc}")
        # vLLM answers 400 "already loaded" when another router replica was first.
        if resp.status != 200 and "already" not in text:
            self.metrics.upstream_errors.labels(worker.id, "lora_load").inc()
            return APIError(503, f"worker {worker.id} could not load adapter {name!r}: {text}")
        if worker.listed is not None:
            worker.listed = worker.listed | {name}
        return None

    async def _traced_attempt(
        self,
        request: web.Request,
        req: ParsedRequest,
        plan: Plan,
        raw: bytes,
        worker: Worker,
        number: int,
        *,
        request_id: str | None = None,
        decode_leg: bool = False,
        prefill_worker: Worker | None = None,
    ) -> web.StreamResponse | APIError:
        attrs: dict[str, str | int] = {ATTR_WORKER: worker.id, ATTR_ATTEMPT: number}
        if decode_leg:
            attrs[ATTR_LEG] = "decode"
        with self.tracer.start_as_current_span(
            "attempt", kind=SpanKind.CLIENT, attributes=attrs
        ) as span:
            out = await self._attempt(
                request,
                req,
                plan,
                raw,
                worker,
                request_id=request_id,
                decode_leg=decode_leg,
                prefill_worker=prefill_worker,
            )
            span.set_attribute(ATTR_STATUS, out.status)
            if isinstance(out, APIError):
                span.set_status(Status(StatusCode.ERROR, out.message))
            return out

    async def _attempt(
        self,
        request: web.Request,
        req: ParsedRequest,
        plan: Plan,
        raw: bytes,
        worker: Worker,
        *,
        request_id: str | None = None,
        decode_leg: bool = False,
        prefill_worker: Worker | None = None,
    ) -> web.StreamResponse | APIError:
        url = f"{worker.url}{request.path}"
        if worker.id in plan.not_loaded and plan.lora_name and plan.lora_path:
            failed = await self._load_adapter(worker, plan.lora_name, plan.lora_path)
            if failed is not None:
                return failed
        # A decode leg's lease counts the request, not the prompt: the prefill ran elsewhere.
        lease = self._lease(req, plan, worker, 0 if decode_leg else None)
        racing = self.feedback.dispatched(req.model, worker.id, plan)
        worker.inflight += 1
        dispatched = time.monotonic()
        headers = self._headers(request, worker)
        if request_id is not None:
            headers["X-Request-Id"] = request_id
        resp: aiohttp.ClientResponse | None = None
        try:
            try:
                resp = await self.session.post(url, data=raw, headers=headers, timeout=self.timeout)
            except UPSTREAM_ERRORS as exc:
                detail = f"{type(exc).__name__}: {exc}"
                return self._unanswered(req, plan, worker, lease, racing, "connect", detail, exc)
            self.feedback.answered(worker.id)
            if resp.status in RETRY_STATUSES:
                return self._unanswered(
                    req, plan, worker, lease, racing, "status", f"HTTP {resp.status}"
                )
            if resp.status == 404 and worker.listed is not None and req.endpoint in MODEL_404:
                # vLLM's 404 on an inference path: it does not serve the model (an adapter
                # unloaded since the last /v1/models poll). Not a failure of the worker:
                # forget the model there and try the next one.
                worker.listed = worker.listed - {req.model}
                self.metrics.upstream_errors.labels(worker.id, "model_not_found").inc()
                return not_found(
                    f"The model `{req.model}` does not exist.", "model", "model_not_found"
                )
            if resp.content_type == "text/event-stream" and resp.status == 200:
                out = await self._stream(
                    request, req, resp, plan, worker, lease, prefill_worker, dispatched, racing
                )
                if isinstance(out, web.StreamResponse):
                    self.metrics.worker_requests.labels(worker.id).inc()
                return out
            try:
                data = await resp.read()
            except UPSTREAM_ERRORS as exc:
                return self._fail(worker, "read", f"{type(exc).__name__}: {exc}")
            if resp.status >= 500:
                self._fail(worker, "status", f"HTTP {resp.status}")
            else:
                self.pool.record_success(worker)
            if resp.status == 200 and req.count_is_exact:
                self.check_prompt_tokens(req, worker, data)
            if resp.status == 200 and not decode_leg:
                self.feedback.observe_body(req.model, worker.id, plan, data, racing)
            self.metrics.worker_requests.labels(worker.id).inc()
            self._first_byte(request, req.model)
            return web.Response(
                body=data,
                status=resp.status,
                headers=self._response_headers(resp, plan, worker, prefill_worker),
            )
        finally:
            worker.inflight -= 1
            lease.end()
            self.feedback.finished(req.model, worker.id, plan)
            if resp is not None:
                # close() drops the connection when the body was not read to the end (a
                # failure, a client that left): the engine then aborts the request.
                if resp.content.is_eof():
                    resp.release()
                else:
                    resp.close()

    async def _stream(
        self,
        request: web.Request,
        req: ParsedRequest,
        resp: aiohttp.ClientResponse,
        plan: Plan,
        worker: Worker,
        lease: Lease,
        prefill_worker: Worker | None = None,
        dispatched: float | None = None,
        racing: int = 0,
    ) -> web.StreamResponse | APIError:
        def unanswered(detail: str) -> APIError:
            return self._unanswered(req, plan, worker, lease, racing, "stream", detail)

        try:
            first = await resp.content.readany()
        except UPSTREAM_ERRORS as exc:
            return unanswered(f"{type(exc).__name__} before the first byte")
        if not first:
            return unanswered("empty stream")
        status = error_event_status(first)
        if status is not None and status >= 500:
            # The engine took the request and then failed it: a restart (feedback.py).
            self.feedback.aborted(req.model, worker.id, plan, after=lease.recorded)
        if status in RETRY_STATUSES:
            # The engine refused the request before its first token (a restart, an overload)
            # after opening the stream: nothing reached the client yet, so it is retried like
            # an HTTP 503, and what its dispatch recorded there is false.
            return unanswered(f"error event {status} before the first token")
        lease.first_byte()
        if dispatched is not None and prefill_worker is None:
            # The worker's prefill speed: its TTFT covered this prompt's uncached tokens and
            # the prefill queued ahead of it when it was dispatched. A decode leg's TTFT
            # timed another worker's prefill and the transfer: it teaches nothing here.
            queued = next((c.prefill_tokens for c in plan.candidates if c.worker == worker.id), 0)
            uncached = max(0, plan.prompt_tokens - plan.matched_tokens(worker.id))
            worker.observe_prefill(uncached + queued, time.monotonic() - dispatched)
        self.pool.record_success(worker)
        out = web.StreamResponse(
            status=resp.status,
            headers=self._response_headers(resp, plan, worker, prefill_worker),
        )
        # The usage chunk comes last (stream_options.include_usage); look at each chunk with
        # the end of the one before, in case the count straddles two reads.
        checking = req.count_is_exact
        # A decode leg's cached tokens count what the prefill worker pushed (feedback.py).
        awaiting_cached = prefill_worker is None
        tail = first[-64:]
        # An error event past the first bytes: the engine aborted the running request.
        watching = status is not None or not self._aborted_in(req, plan, worker, lease, first)
        if checking and self.check_prompt_tokens(req, worker, first):
            checking = False
        if awaiting_cached and self.feedback.observe_body(
            req.model, worker.id, plan, first, racing
        ):
            awaiting_cached = False
        try:
            await out.prepare(request)
            await out.write(first)
            self._first_byte(request, req.model)
            while True:
                try:
                    chunk = await resp.content.readany()
                except UPSTREAM_ERRORS as exc:
                    if not isinstance(exc, asyncio.TimeoutError):
                        # The connection dropped under a running request: the engine died
                        # or restarted (a stalled one times out instead, and may recover).
                        self.feedback.aborted(req.model, worker.id, plan, after=lease.recorded)
                    self._fail(worker, "stream", f"{type(exc).__name__} mid-stream")
                    await out.write(sse_error_event(f"worker {worker.id} failed mid-stream"))
                    break
                if not chunk:
                    break
                await out.write(chunk)
                if watching:
                    watching = not self._aborted_in(req, plan, worker, lease, tail + chunk)
                if checking and self.check_prompt_tokens(req, worker, tail + chunk):
                    checking = False
                if awaiting_cached and self.feedback.observe_body(
                    req.model, worker.id, plan, tail + chunk, racing
                ):
                    awaiting_cached = False
                tail = chunk[-64:]
            await out.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            log.debug("client left a stream from %s; closing the upstream request", worker.id)
        return out
