"""The router's edge: what a slow, greedy or bursty client may cost a replica.

Three bounds, each off or generous by default (docs/settings.md):

* **Header read timeout and header limits.** aiohttp parses headers into a connection that
  stays open as long as the client trickles bytes (its keep-alive timer, 75 s, is the only
  bound, and it is shared with idle keep-alive). `EdgeRunner` serves the app with a request
  handler that drops a connection whose request line and headers are not complete
  ``header_timeout_s`` after their first byte, and passes ``max_headers`` and
  ``max_header_bytes`` to aiohttp's parser (400 beyond them).
* **Request rate per client** (`RateLimiter`): a token bucket per client key in Redis
  (take_token-1.lua), so every replica draws from the same bucket; 429 with ``Retry-After``.
  The key is the API key (digested; the key itself never reaches Redis) or, without one, the
  peer address. With Redis down the limit is not enforced: the router keeps serving, as it
  does for routing.
* **Concurrent requests per replica** (`ConcurrencyGate`): beyond ``max_concurrent``
  inference requests in flight the replica answers 503 with ``Retry-After`` at once, before
  reading the body, instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from kvrouter.index.keys import KeySchema
from kvrouter.index.script_loader import load_scripts
from kvrouter.index.transport import ScriptCall
from router_node.errors import APIError
from router_node.metrics import Metrics
from router_node.settings import RouterSettings
from router_node.shared_index import REDIS_FAILURES, SharedIndex

log = logging.getLogger(__name__)


# -- header read timeout -----------------------------------------------------------------------
class _EdgeHandler(RequestHandler):
    """aiohttp's connection handler with a deadline on reading one request's headers.

    The deadline starts at the first byte of a request (not at connection start, so an idle
    keep-alive connection is left to aiohttp's keep-alive timer) and ends when aiohttp's
    parser has produced the request. It reads two attributes of aiohttp's handler
    (``_request_count``, ``_request_in_progress``); tests/router/test_edge.py fails if a new
    aiohttp changes them.
    """

    def __init__(
        self, manager: Server, *, header_timeout: float, on_drop: Any, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._on_drop = on_drop
        self._header_deadline: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._cancel_deadline()  # the headers are complete (the body is not our concern)
        elif (
            data
            and self._header_deadline is None
            and not self._request_in_progress
            and self.transport is not None
        ):
            self._header_deadline = self._loop.call_later(
                self._header_timeout, self._headers_late, before
            )

    def _headers_late(self, count: int) -> None:
        self._header_deadline = None
        if self._request_count == count and not self._request_in_progress:
            self._on_drop()
            self.force_close()

    def _cancel_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)


class _EdgeServer(Server):
    def __init__(self, *args: Any, header_timeout: float, on_drop: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._on_drop = on_drop
        self._handler_kwargs = kwargs

    def __call__(self) -> RequestHandler:
        return _EdgeHandler(
            self,
            header_timeout=self._header_timeout,
            on_drop=self._on_drop,
            loop=self._loop,
            **{k: v for k, v in self._handler_kwargs.items() if k not in _SERVER_ONLY},
        )


# Server's own keyword arguments, not the handler's.
_SERVER_ONLY = ("request_factory", "handler_cancellation", "loop")


def handler_limits(settings: RouterSettings) -> dict[str, Any]:
    """aiohttp's parser limits from the settings (for ``AppRunner`` and ``run_app``)."""
    return {
        "max_headers": settings.max_headers,
        "max_field_size": settings.max_header_bytes,
        "max_line_size": settings.max_header_bytes,
    }


class EdgeRunner(web.AppRunner):
    """An ``AppRunner`` whose connections have the header read timeout (when it is on) and
    the header count and size limits of `settings`."""

    def __init__(
        self,
        app: web.Application,
        settings: RouterSettings,
        metrics: Metrics | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **handler_limits(settings), **kwargs)
        self._settings = settings
        self._metrics = metrics

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        timeout = self._settings.header_timeout_s
        if timeout <= 0:
            return server
        metrics = self._metrics

        def on_drop() -> None:
            if metrics is not None:
                metrics.edge_refused.labels("header_timeout").inc()

        return _EdgeServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            header_timeout=timeout,
            on_drop=on_drop,
            **server._kwargs,
        )


# -- rate limit --------------------------------------------------------------------------------
def client_key(request: web.Request, header: str = "Authorization") -> str:
    """Whom a request's rate is counted against: its API key (a digest of it, so the key is
    never stored) or, without one, the peer address."""
    given = request.headers.get(header, "").strip()
    if given:
        return "k" + hashlib.sha256(given.encode()).hexdigest()[:32]
    return "a" + (request.remote or "unknown").replace(" ", "_")


class RateLimiter:
    """One token bucket per client key in Redis, shared by every replica of the router."""

    def __init__(self, settings: RouterSettings, shared: SharedIndex) -> None:
        self.rate = settings.rate_limit_rps
        self.burst = settings.rate_limit_burst or max(1, math.ceil(self.rate))
        self.schema: KeySchema = settings.key_schema
        self.shared = shared
        self.script = load_scripts()["take_token"]

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    async def take(self, client: str) -> float:
        """0 when `client` may send this request, else the seconds until it may. With the
        shared index down or off it is 0: no replica can count alone for the fleet."""
        idx = self.shared.index
        if not self.enabled or idx is None or not self.shared.up:
            return 0.0
        call = ScriptCall(
            self.script, [self.schema.rate_bucket(client)], [repr(self.rate), self.burst, 0]
        )
        try:
            allowed, wait_ms = await idx.call(call)
        except REDIS_FAILURES as exc:
            self.shared.mark_down("rate_limit", exc)
            return 0.0
        return 0.0 if int(allowed) == 1 else int(wait_ms) / 1000


# -- concurrency -------------------------------------------------------------------------------
class ConcurrencyGate:
    """A count of inference requests in flight on this replica, bounded by ``limit``
    (0 = no bound)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def enter(self) -> bool:
        if self.limit and self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1


def rate_limited(retry_after_s: float) -> APIError:
    """429 in the shape OpenAI's API uses, with whole seconds in ``Retry-After``."""
    return APIError(
        429,
        "request rate limit reached for this client; retry after the time in Retry-After",
        type_="rate_limit_error",
        code="rate_limit_exceeded",
        retry_after=max(1, math.ceil(retry_after_s)),
    )


def overloaded(retry_after: int) -> APIError:
    """503 when the replica is at its bound of concurrent requests."""
    return APIError(
        503,
        "this router replica is at its limit of concurrent requests",
        type_="service_unavailable",
        code="overloaded",
        retry_after=retry_after,
    )
