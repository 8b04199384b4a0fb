"""Errors at the HTTP edge, as OpenAI-style JSON bodies.

Handlers raise `APIError`; one middleware turns it into
``{"error": {"message", "type", "param", "code"}}`` with the right status (and Retry-After
on 503), so every client library that speaks OpenAI reports it properly.
"""

from __future__ import annotations

import json
import re

from aiohttp import web


class APIError(Exception):
    """An error the client should see, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code if self.code is not None else self.status,
            }
        }

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        h = dict(headers or {})
        if self.retry_after is not None:
            h["Retry-After"] = str(self.retry_after)
        return web.Response(
            status=self.status,
            body=json.dumps(self.body()).encode(),
            content_type="application/json",
            headers=h,
        )


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, message, type_="not_found_error", param=param, code=code)


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param=param, code="request_too_large")


def unavailable(message: str, retry_after: int) -> APIError:
    return APIError(
        503, message, type_="service_unavailable", code="no_worker", retry_after=retry_after
    )


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type_="authentication_error", code="invalid_token")


def sse_error_event(message: str, code: int = 502) -> bytes:
    """The event that ends a stream the router cannot finish (as vLLM ends a failed stream:
    an error event, then [DONE])."""
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"


# A stream that opens with an error event: {"error": {..., "code": N}} (what `sse_error_event`
# writes, as vLLM and the simulator do) or vLLM's older {"object": "error", ..., "code": N}.
_ERROR_EVENT = re.compile(rb'^data: \{"(?:error"|object"\s*:\s*"error")')
_ERROR_CODE = re.compile(rb'"code"\s*:\s*(\d{3})\b')


def error_event_status(first: bytes) -> int | None:
    """The HTTP status an engine's stream reports when its first event is an error (the
    engine failed the request before any token: vLLM yields it that way once the response
    has started), else None; 500 when the event names no 3-digit code."""
    if not _ERROR_EVENT.match(first):
        return None
    code = _ERROR_CODE.search(first)
    return int(code.group(1)) if code is not None else 500


# The same event anywhere in a piece of a stream (after other events): it starts a line. A
# completion's text cannot match: quotes inside JSON strings are escaped.
_ERROR_EVENT_IN = re.compile(rb'(?:^|\n)data: \{"(?:error"|object"\s*:\s*"error")')


def error_event_in(data: bytes) -> int | None:
    """The HTTP status of an error event anywhere in `data` (a piece of a stream, events
    before it), as `error_event_status` reads it; 500 when its code is not (yet) in `data`."""
    found = _ERROR_EVENT_IN.search(data)
    if found is None:
        return None
    code = _ERROR_CODE.search(data, found.end())
    return int(code.group(1)) if code is not None else 500
