"""The router benchmark's upstream: a vLLM stand-in that answers every completion at once.

`kvrouter bench router` measures what the router adds to a request, so the worker behind it
must cost next to nothing: it reads the body and returns the same small JSON completion
(or, for ``"stream": true``, the same 8 SSE events and ``[DONE]``, each written on its own),
with no prefix-cache model and no tokenizer. It runs in a process of its own, as a worker
would, so its event loop never competes with the benchmark client's::

    python -m kvrouter.bench.canned_worker --port 9000
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from aiohttp import web

BODY = json.dumps(
    {
        "id": "cmpl-fast",
        "object": "text_completion",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "text": " ok", "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()


STREAM_CHUNKS = 8
"""Tokens a streamed answer carries, one SSE event each, then ``data: [DONE]``."""
CHUNK = (
    b"data: "
    + json.dumps(
        {
            "id": "cmpl-fast",
            "object": "text_completion",
            "created": 0,
            "model": "bench",
            "choices": [{"index": 0, "text": " ok", "finish_reason": None, "logprobs": None}],
        }
    ).encode()
    + b"\n\n"
)


async def _complete(request: web.Request) -> web.StreamResponse:
    raw = await request.read()  # a real worker reads the whole prompt; so does this one
    # A byte search, not a JSON parse: the worker must cost next to nothing.
    if b'"stream": true' not in raw and b'"stream":true' not in raw:
        return web.Response(body=BODY, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    # One write per event, as an engine sends tokens: each is its own chunk on the wire.
    for _ in range(STREAM_CHUNKS):
        await resp.write(CHUNK)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _health(request: web.Request) -> web.Response:
    return web.json_response({})


async def _no_models(request: web.Request) -> web.Response:
    # No /v1/models, as a worker the router was configured with by hand: it routes on the
    # configured model list.
    return web.json_response({"error": "not found"}, status=404)


def canned_app() -> web.Application:
    """The canned worker's aiohttp application."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/completions", _complete)
    app.router.add_post("/v1/chat/completions", _complete)
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _no_models)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until killed."""
    p = argparse.ArgumentParser(prog="python -m kvrouter.bench.canned_worker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    web.run_app(
        canned_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
