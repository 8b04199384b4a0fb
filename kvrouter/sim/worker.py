"""One simulated vLLM-compatible worker: OpenAI HTTP API, /metrics, KV events, admin.

Endpoints (as vLLM's OpenAI server unless marked):

- `POST /v1/completions` (prompt: string or token ids), `POST /v1/chat/completions`:
  streaming (`data: {...}` SSE chunks, then `data: [DONE]`) or not; `usage` carries
  `prompt_tokens_details.cached_tokens`; `stream_options.include_usage` adds a final usage
  chunk. Generation always runs to `max_tokens` (EOS is ignored).
- `POST /v1/responses` (not streamed): the input rendered as the chat vLLM makes of it,
  then generated like a chat; `usage.input_tokens`. `POST /v1/embeddings` (text or token
  ids; a fixed small vector each, `usage.prompt_tokens`), `POST /tokenize`,
  `POST /detokenize`, `POST /v1/score` and `/v1/rerank` (also `/score`, `/rerank`,
  `/v2/rerank`; a fixed score): enough for a router to route them and a client to parse
  the answer; no engine time is spent on them.
- `GET /v1/models`, `GET /health`, `GET /metrics`, `POST /reset_prefix_cache`.
- Prefill/decode disaggregation as vLLM's NixlConnector speaks it (docs/disaggregation.md):
  a request with ``kv_transfer_params.do_remote_decode`` is a prefill leg, answered with
  ``kv_transfer_params`` (``do_remote_prefill``, ``remote_block_ids``, ``remote_engine_id``,
  ``remote_request_id``, ``remote_host``, ``remote_port``, ``tp_size``); a request with
  ``do_remote_prefill`` and those fields is a decode leg: the worker "pulls" the prompt
  blocks it does not hold (waiting ``kv_bytes_per_token x tokens / transfer_gb_per_s``
  simulated seconds), caches them (BlockStored events) and decodes. Params without the
  fields are logged, counted (``invalid_params``) and the prompt is recomputed, as vLLM does.
- Simulator-only fault injection: `POST /admin/reset_prefix_cache` (same as vLLM's), `POST
  /admin/restart?down_s=S` (fail every request, empty the cache silently, restart the event
  seq at 0, answer how many requests it aborted; with S > 0 also stop listening for S real
  seconds and close kept-alive connections, as an exiting engine server does), `POST
  /admin/drop_events?count=K&replay=1` (swallow the next K event batches on the live stream;
  replay=0 also keeps them out of the replay buffer), `GET /admin/state` (JSON snapshot, P/D
  counters and the last legs' params included), `POST
  /admin/pd_fault?mode=omit|malformed|fail&count=K` (the next K prefill legs answer without
  kv_transfer_params, with malformed ones, or with a 503).

Every response carries `x-sim-worker: <worker id>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import zmq.asyncio
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from kvrouter.sim.engine import Engine
from kvrouter.sim.kvcache import chain_hashes, root_digest, token_bytes
from kvrouter.sim.metrics import registry as metrics_registry
from kvrouter.sim.metrics import render_metrics
from kvrouter.sim.publisher import EventPublisher
from kvrouter.sim.scheduler import EngineConfig, RequestRejected, RequestState, SimRequest
from kvrouter.sim.settings import SimSettings
from kvrouter.sim.tokenizer import ByteTokenizer, ChatFormatError, Tokenizer

log = logging.getLogger(__name__)

WORKER_HEADER = "x-sim-worker"
DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """An error answered as an OpenAI-style JSON body."""

    def __init__(
        self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.status,
            }
        }


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """How to reach one simulated worker; one entry of the ready file's `workers`."""

    id: str
    url: str
    host: str
    port: int
    events_endpoint: str | None
    replay_endpoint: str | None
    topic: str
    dp_rank: int = 0
    role: str = "both"
    """prefill, decode or both (`kvrouter sim --prefill-workers`)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def engine_config(settings: SimSettings, speed: float = 1.0) -> EngineConfig:
    """The engine shape a worker gets from the fleet's settings, at speed factor `speed`
    (its entry of ``--speed-mix``)."""
    return EngineConfig(
        block_size=settings.block_size,
        num_blocks=settings.num_gpu_blocks,
        prefill_tokens_per_s=settings.prefill_tokens_per_s * speed,
        decode_step_s=settings.decode_step_ms / 1000.0 / speed,
        decode_step_s_per_seq=settings.decode_step_ms_per_seq / 1000.0 / speed,
        max_batch=settings.max_batch,
        max_batched_tokens=settings.max_batched_tokens,
        max_model_len=settings.max_model_len,
        cpu_blocks=settings.cpu_capacity_tokens // settings.block_size,
        cpu_load_tokens_per_s=settings.cpu_load_tokens_per_s * speed,
    )


WORKER_KEY: web.AppKey[SimWorker] = web.AppKey("sim_worker")


class SimWorker:
    """One worker: its engine, event publisher and HTTP server, all on the current loop."""

    def __init__(
        self,
        worker_id: str,
        settings: SimSettings,
        *,
        port: int,
        events_port: int = 0,
        replay_port: int = 0,
        zmq_ctx: zmq.asyncio.Context | None = None,
        tokenizer: Tokenizer | None = None,
        speed: float = 1.0,
        role: str = "both",
    ) -> None:
        self.worker_id = worker_id
        self.speed = speed
        self.role = role
        self.pd: dict[str, Any] = {
            "prefill_legs": 0,
            "prefill_aborted": 0,
            "remote_decodes": 0,
            "invalid_params": 0,
            "pulled_tokens": 0,
            "pulled_bytes": 0,
            "last_prefill": None,
            "last_decode": None,
        }
        """Prefill/decode counters and the last legs seen (for /admin/state and tests)."""
        self.pd_fault: tuple[str, int] = ("", 0)
        self.settings = settings
        self.tokenizer: Tokenizer = tokenizer or ByteTokenizer()
        self._port = port
        self.publisher: EventPublisher | None = None
        if settings.kv_events != "off":
            if zmq_ctx is None:
                raise ValueError("KV events need a zmq.asyncio.Context")
            self.publisher = EventPublisher(
                zmq_ctx,
                host=settings.host,
                port=events_port,
                replay_port=replay_port,
                encoding=settings.kv_events,
                topic=settings.kv_events_topic,
                buffer_steps=settings.kv_events_buffer_steps,
            )
        # An adapter's blocks never match the base model's or another adapter's (as in vLLM,
        # whose block hashes fold in the LoRA): its own hash root.
        self.adapter_roots = {
            a: root_digest(f"{settings.model}\0lora\0{a}", settings.seed) for a in settings.adapters
        }
        self.engine = Engine(
            engine_config(settings, speed),
            root_digest(settings.model, settings.seed),
            time_scale=settings.time_scale,
            on_events=self.publisher.publish if self.publisher else None,
        )
        self.registry = metrics_registry(self.engine, model=settings.model)
        self.app = create_worker_app(self)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._down_until = 0.0
        self._bg: set[asyncio.Task[None]] = set()
        self.info: WorkerInfo | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> WorkerInfo:
        """Start the engine and publisher (cleanup_ctx) and listen; returns how to reach it."""
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.settings.host, self._port, reuse_address=True)
        await self._site.start()
        self._port = int(self._runner.addresses[-1][1])
        host = self.settings.host
        pub = self.publisher
        self.info = WorkerInfo(
            id=self.worker_id,
            url=f"http://{host}:{self._port}",
            host=host,
            port=self._port,
            events_endpoint=pub.endpoint if pub else None,
            replay_endpoint=pub.replay_endpoint if pub else None,
            topic=self.settings.kv_events_topic,
            role=self.role,
        )
        return self.info

    async def stop(self) -> None:
        """Fail in-flight requests, stop listening and release everything. Idempotent."""
        for task in list(self._bg):
            task.cancel()
        self.engine.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    @property
    def is_down(self) -> bool:
        return time.monotonic() < self._down_until

    def restart(self, down_s: float = 0.0) -> int:
        """Simulate an engine restart (see the module docstring); returns how many requests
        it aborted. With `down_s` > 0 the worker refuses requests from this instant, as a
        dead engine does (503 until `go_down` closes the port and the kept-alive
        connections), so none reaches the new engine before its aborts have been sent."""
        if down_s > 0:
            self._down_until = time.monotonic() + down_s
        aborted = self.engine.restart()
        if self.publisher is not None:
            self.publisher.restart()
        return aborted

    async def go_down(self, down_s: float) -> None:
        """Close the port for `down_s` seconds (a restarting engine's server), then reopen."""
        if down_s <= 0 or self._runner is None or self._site is None:
            return
        self._down_until = max(self._down_until, time.monotonic() + down_s)
        await self._site.stop()
        # As the engine's server exits: kept-alive connections close (idle ones now, busy
        # ones once their answer, the aborted streams' error events, is out), so clients see
        # refused connections until it listens again, as they would from a real restart.
        for conn in list(self._runner.server.connections if self._runner.server else ()):
            waiter = getattr(conn, "_waiter", None)  # aiohttp's own test for an idle handler
            if waiter is not None and not waiter.done():
                conn.force_close()
            else:
                conn.close()
        await asyncio.sleep(down_s)
        self._site = web.TCPSite(self._runner, self.settings.host, self._port, reuse_address=True)
        await self._site.start()

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run a background job tied to this worker's lifetime."""

        async def wrap() -> None:
            await coro

        task = asyncio.create_task(wrap())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # -- generation ----------------------------------------------------------------------

    async def generate(
        self,
        request: web.Request,
        prompt: Sequence[int],
        max_tokens: int,
        *,
        chat: bool,
        stream: bool,
        include_usage: bool,
        model: str,
        responses: bool = False,
        kv_params: Mapping[str, Any] | None = None,
        cache_salt: str | None = None,
    ) -> web.StreamResponse:
        """Run one request through the engine and answer it, streaming or not (`responses`:
        in the Responses API's shape, never streamed). `kv_params`: the request's
        kv_transfer_params (a prefill or a decode leg of a split request). A `cache_salt`
        gives the request's blocks their own hash root (as vLLM's salt does): they are shared
        only with requests of the same salt."""
        if self.is_down:
            raise ApiError(503, "the engine is restarting", "ServiceUnavailableError")
        lora = model if model in self.adapter_roots else None
        root = self.adapter_roots[lora] if lora else self.engine.scheduler.root
        if cache_salt is not None:
            base = f"{self.settings.model}\0lora\0{lora}" if lora else self.settings.model
            root = root_digest(f"{base}\0salt\0{cache_salt}", self.settings.seed)
        prefill_leg = bool(kv_params and kv_params.get("do_remote_decode"))
        remote = 0
        if prefill_leg:
            assert kv_params is not None
            self.pd["prefill_legs"] += 1
            self.pd["last_prefill"] = {
                "kv_transfer_params": dict(kv_params),
                "max_tokens": max_tokens,
                "stream": stream,
                "request_id": request.headers.get("x-request-id"),
                # Tests check that the router's prefill span is the parent vLLM continues.
                "traceparent": request.headers.get("traceparent"),
            }
            if self.pd_fault[0] == "fail" and self._take_fault():
                raise ApiError(503, "injected prefill failure", "ServiceUnavailableError")
        elif kv_params and kv_params.get("do_remote_prefill"):
            remote = await self._pull(prompt, root, kv_params, request, max_tokens, stream)
        try:
            req = self.engine.submit(
                prompt, max_tokens, root=root, lora_name=lora, cache_salt=cache_salt,
                remote_tokens=remote,
            )  # fmt: skip
        except RequestRejected as exc:
            raise ApiError(400, str(exc), param="max_tokens") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        fmt = _ChunkFormat(rid, created, model, chat, self.tokenizer, responses)
        try:
            if stream:
                return await self._stream(request, req, fmt, include_usage)
            async for _ in _progress(req):
                pass
            if req.state is not RequestState.FINISHED:
                raise ApiError(503, req.error or "request aborted", "ServiceUnavailableError")
            body = fmt.full(req)
            if prefill_leg:
                params: dict[str, Any] | None = self._transfer_params(req, rid)
                fault = self.pd_fault[0]
                if fault == "omit" and self._take_fault():
                    params = None
                elif fault == "malformed" and self._take_fault():
                    params = {"do_remote_prefill": True, "remote_block_ids": "not a list"}
                body["kv_transfer_params"] = params
            return web.json_response(body, headers={WORKER_HEADER: self.worker_id})
        finally:
            if prefill_leg and req.state is not RequestState.FINISHED:
                self.pd["prefill_aborted"] += 1  # the router (client) went away mid-prefill
            self.engine.abort(req)

    def _take_fault(self) -> bool:
        fault, left = self.pd_fault
        if left <= 0:
            return False
        self.pd_fault = (fault, left - 1)
        return True

    def _transfer_params(self, req: SimRequest, rid: str) -> dict[str, Any]:
        """What vLLM's prefill worker answers: where the decode worker pulls the KV from."""
        bs = self.settings.block_size
        req.ensure_hashes(req.prompt_len // bs, bs)
        held = self.engine.scheduler.cache.match_prefix(
            req.hashes[: req.prompt_len // bs], req.prompt_len
        )
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": list(held),
            "remote_engine_id": self.worker_id,
            "remote_request_id": rid,
            "remote_host": self.settings.host,
            "remote_port": self._port,
            "tp_size": 1,
        }

    async def _pull(
        self,
        prompt: Sequence[int],
        root: bytes,
        params: Mapping[str, Any],
        request: web.Request,
        max_tokens: int,
        stream: bool,
    ) -> int:
        """A decode leg: wait for the pull of the blocks this worker lacks; returns the prompt
        tokens now held (0 when the params are unusable: the prompt is recomputed)."""
        self.pd["last_decode"] = {
            "kv_transfer_params": dict(params),
            "max_tokens": max_tokens,
            "stream": stream,
            "request_id": request.headers.get("x-request-id"),
        }
        blocks = params.get("remote_block_ids")
        needed = ("remote_engine_id", "remote_host", "remote_port", "remote_block_ids")
        if any(params.get(k) is None for k in needed) or not isinstance(blocks, list):
            self.pd["invalid_params"] += 1
            log.warning("%s: invalid KVTransferParams %r; recomputing", self.worker_id, params)
            return 0
        bs = self.settings.block_size
        remote = min(len(blocks), len(prompt) // bs) * bs
        hashes, _ = chain_hashes(root, token_bytes(prompt[:remote]), bs)
        local = len(self.engine.scheduler.cache.match_prefix(hashes, len(prompt))) * bs
        pulled = max(0, remote - local)  # blocks it already holds need no transfer
        self.pd["remote_decodes"] += 1
        self.pd["pulled_tokens"] += pulled
        self.pd["pulled_bytes"] += pulled * self.settings.kv_bytes_per_token
        wait = self.settings.transfer_s(pulled) / self.settings.time_scale
        if wait > 0:
            await asyncio.sleep(wait)
        return remote

    async def _stream(
        self, request: web.Request, req: SimRequest, fmt: _ChunkFormat, include_usage: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                WORKER_HEADER: self.worker_id,
            }
        )
        await resp.prepare(request)
        sent = 0
        first = True
        async for upto, done in _progress(req):
            if upto > sent:
                new = req.tokens[req.prompt_len + sent : req.prompt_len + upto]
                sent = upto
                finished = done and req.state is RequestState.FINISHED
                for chunk in fmt.chunks(new.tolist(), first, finished, include_usage):
                    await resp.write(_sse(chunk))
                first = False
        if req.state is RequestState.ABORTED:
            await resp.write(
                _sse(
                    ApiError(503, req.error or "request aborted", "ServiceUnavailableError").body()
                )
            )
        elif include_usage:
            await resp.write(_sse(fmt.usage_chunk(req)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def state(self) -> dict[str, Any]:
        """A JSON snapshot for `/admin/state` and debugging."""
        sched = self.engine.scheduler
        cache = sched.cache
        pub = self.publisher
        return {
            "id": self.worker_id,
            "running": len(sched.running),
            "waiting": len(sched.waiting),
            "num_gpu_blocks": cache.num_blocks,
            "free_blocks": cache.num_free,
            "cached_blocks": cache.num_cached,
            "usage": cache.usage,
            "sim_time_s": self.engine.now_s(),
            "stats": asdict(sched.stats),
            "role": self.role,
            "pd": self.pd,
            "events": None
            if pub is None
            else {
                "next_seq": pub.next_seq,
                "sent": pub.batches_sent,
                "dropped": pub.batches_dropped,
            },
        }


async def _progress(req: SimRequest) -> AsyncIterator[tuple[int, bool]]:
    """Yield (tokens generated so far, done) each time the engine signals, until done."""
    event = req.notify
    assert isinstance(event, asyncio.Event)
    while True:
        done = req.done
        yield req.num_generated, done
        if done:
            return
        await event.wait()
        event.clear()


def _sse(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _ChunkFormat:
    """Builds OpenAI completion / chat bodies for one request."""

    __slots__ = ("chat", "created", "model", "responses", "rid", "tok")

    def __init__(
        self, rid: str, created: int, model: str, chat: bool, tok: Tokenizer, responses: bool
    ) -> None:
        self.rid, self.created, self.model, self.chat, self.tok = rid, created, model, chat, tok
        self.responses = responses

    def _envelope(self, choices: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunks(
        self, tokens: Sequence[int], first: bool, finished: bool, include_usage: bool
    ) -> list[dict[str, Any]]:
        text = self.tok.decode(tokens)
        reason = "length" if finished else None
        out: list[dict[str, Any]] = []
        if self.chat:
            kind = "chat.completion.chunk"
            if first:
                role = {"index": 0, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}  # fmt: skip
                out.append(self._envelope([role], kind))
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None,
                      "finish_reason": reason}  # fmt: skip
        else:
            kind = "text_completion"
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
                      "stop_reason": None}  # fmt: skip
        out.append(self._envelope([choice], kind))
        if include_usage:
            for chunk in out:
                chunk["usage"] = None
        return out

    def usage_chunk(self, req: SimRequest) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = self._envelope([], kind)
        body["usage"] = usage(req)
        return body

    def full(self, req: SimRequest) -> dict[str, Any]:
        text = self.tok.decode(req.output_tokens.tolist())
        if self.responses:
            return _responses_body(self.rid, self.created, self.model, text, req)
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
            body = self._envelope([choice], "chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                      "stop_reason": None, "prompt_logprobs": None}  # fmt: skip
            body = self._envelope([choice], "text_completion")
        body["usage"] = usage(req)
        return body


def _responses_body(
    rid: str, created: int, model: str, text: str, req: SimRequest
) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": f"msg_{rid}", "type": "message", "role": "assistant",
            "status": "completed", "content": [part]}  # fmt: skip
    return {
        "id": f"resp_{rid}",
        "object": "response",
        "created_at": created,
        "model": model,
        "status": "completed",
        "output": [item],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": req.prompt_len,
            "input_tokens_details": {"cached_tokens": req.cached_tokens or 0},
            "output_tokens": req.num_generated,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": req.prompt_len + req.num_generated,
        },
    }


def usage(req: SimRequest) -> dict[str, Any]:
    """OpenAI usage of a request, with vLLM's `prompt_tokens_details.cached_tokens`."""
    return {
        "prompt_tokens": req.prompt_len,
        "total_tokens": req.prompt_len + req.num_generated,
        "completion_tokens": req.num_generated,
        "prompt_tokens_details": {"cached_tokens": req.cached_tokens or 0},
    }


# -- request parsing -------------------------------------------------------------------------


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _token_array(value: Sequence[Any], param: str) -> array[int]:
    # array() range- and type-checks in C; a per-token Python check costs more than the
    # rest of the request on long prompts.
    try:
        return array("I", value)
    except (OverflowError, TypeError):
        raise ApiError(400, "token ids must be integers in [0, 2**32)", param=param) from None


def _prompt_tokens(prompt: Any, tok: Tokenizer) -> Sequence[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tok.encode(prompt)
    if isinstance(prompt, list):
        if prompt and isinstance(prompt[0], str | list):
            raise ApiError(
                400, "batched prompts are not supported by the simulator", param="prompt"
            )
        return _token_array(prompt, "prompt")
    raise ApiError(400, "prompt must be a string or a list of token ids", param="prompt")


def _int_param(body: Mapping[str, Any], *names: str, default: int) -> int:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise ApiError(400, f"{name} must be a positive integer", param=name)
        return value
    return default


def _kv_params(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    params = body.get("kv_transfer_params")
    if params is not None and not isinstance(params, dict):
        raise ApiError(400, "kv_transfer_params must be an object", param="kv_transfer_params")
    return params


def _salt(body: Mapping[str, Any]) -> str | None:
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ApiError(400, "cache_salt must be a non-empty string", param="cache_salt")
    return salt


def _common(body: Mapping[str, Any], worker: SimWorker) -> tuple[str, bool, bool]:
    model = body.get("model") or worker.settings.model
    if model != worker.settings.model and model not in worker.adapter_roots:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    if body.get("n", 1) != 1:
        raise ApiError(400, "the simulator supports n=1 only", param="n")
    stream = bool(body.get("stream", False))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return model, stream, bool(options.get("include_usage", False))


# -- handlers --------------------------------------------------------------------------------


async def completions(request: web.Request) -> web.StreamResponse:
    worker = request.app[WORKER_KEY]
    body = await _json_body(request)
    model, stream, include_usage = _common(body, worker)
    if "prompt" not in body:
        raise ApiError(400, "prompt is required", param="prompt")
    prompt = _prompt_tokens(body["prompt"], worker.tokenizer)
    max_tokens = _int_param(body, "max_tokens", default=DEFAULT_MAX_TOKENS)
    return await worker.generate(
        request, prompt, max_tokens, chat=False, stream=stream,
        include_usage=include_usage, model=model, kv_params=_kv_params(body),
        cache_salt=_salt(body),
    )  # fmt: skip


async def chat_completions(request: web.Request) -> web.StreamResponse:
    worker = request.app[WORKER_KEY]
    body = await _json_body(request)
    model, stream, include_usage = _common(body, worker)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    prompt = _chat_prompt(worker.tokenizer, body)
    max_tokens = _int_param(body, "max_completion_tokens", "max_tokens", default=DEFAULT_MAX_TOKENS)
    return await worker.generate(
        request, prompt, max_tokens, chat=True, stream=stream,
        include_usage=include_usage, model=model, kv_params=_kv_params(body),
        cache_salt=_salt(body),
    )  # fmt: skip


def _chat_prompt(tok: Tokenizer, body: Mapping[str, Any]) -> Sequence[int]:
    """A chat body's prompt: the whole request through a tokenizer that applies vLLM's
    request preprocessing (the router's Tokenizer), else the messages alone."""
    if not isinstance(body.get("messages"), list):
        # vLLM answers 400 (request validation); iterating None would be a 500 here.
        raise ApiError(400, "messages must be a list of message objects", param="messages")
    encode_request = getattr(tok, "encode_chat_request", None)
    if encode_request is None:
        try:
            return tok.encode_chat(body["messages"])
        except ChatFormatError as exc:
            raise ApiError(400, str(exc), param="messages") from None
    from kvrouter.tokenizer.errors import TokenizerError

    try:
        ids: Sequence[int] = encode_request(body)
    except TokenizerError as exc:  # the request's fault, or content it cannot render
        raise ApiError(400, str(exc), param="messages") from None
    return ids


async def responses(request: web.Request) -> web.StreamResponse:
    from kvrouter.tokenizer.errors import TokenizerError
    from kvrouter.tokenizer.preprocess import responses_to_chat_body

    worker = request.app[WORKER_KEY]
    body = await _json_body(request)
    model, stream, _ = _common(body, worker)
    if stream:
        raise ApiError(400, "the simulator does not stream the Responses API", param="stream")
    if body.get("previous_response_id") is not None:
        # The simulator stores no responses (vLLM answers 404 for one it does not have).
        raise ApiError(404, "previous response not found", "NotFoundError",
                       "previous_response_id")  # fmt: skip
    try:
        chat = responses_to_chat_body(body)
    except TokenizerError as exc:
        raise ApiError(400, str(exc), param="input") from None
    prompt = _chat_prompt(worker.tokenizer, chat)
    max_tokens = _int_param(body, "max_output_tokens", default=DEFAULT_MAX_TOKENS)
    return await worker.generate(
        request, prompt, max_tokens, chat=True, stream=False,
        include_usage=False, model=model, responses=True,
    )  # fmt: skip


def _text_inputs(value: Any, tok: Tokenizer, param: str) -> list[Sequence[int]]:
    if isinstance(value, str) or (isinstance(value, list) and value and type(value[0]) is int):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{param} must be a string, token ids or a non-empty list of them",
                       param=param)  # fmt: skip
    out: list[Sequence[int]] = []
    for item in value:
        if isinstance(item, str):
            out.append(tok.encode(item))
        elif isinstance(item, list):
            out.append(_token_array(item, param))
        else:
            raise ApiError(400, f"{param} items must be strings or token-id lists", param=param)
    return out


async def embeddings(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    body = await _json_body(request)
    model, _, _ = _common(body, worker)
    inputs = _text_inputs(body.get("input"), worker.tokenizer, "input")
    n = sum(len(ids) for ids in inputs)
    data = [{"object": "embedding", "index": i, "embedding": [0.0, 1.0]}
            for i in range(len(inputs))]  # fmt: skip
    return web.json_response({"object": "list", "data": data, "model": model,
                              "usage": {"prompt_tokens": n, "total_tokens": n}})  # fmt: skip


async def tokenize_endpoint(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    body = await _json_body(request)
    _common(body, worker)
    if "messages" in body:
        ids = list(_chat_prompt(worker.tokenizer, body))
    else:
        ids = list(_text_inputs(body.get("prompt"), worker.tokenizer, "prompt")[0])
    return web.json_response(
        {"count": len(ids), "max_model_len": worker.settings.max_model_len, "tokens": ids}
    )


async def detokenize_endpoint(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    body = await _json_body(request)
    _common(body, worker)
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise ApiError(400, "tokens must be a list of token ids", param="tokens")
    return web.json_response({"prompt": worker.tokenizer.decode(_token_array(tokens, "tokens"))})


async def score(request: web.Request) -> web.Response:
    """Score and rerank: a fixed relevance per document (the simulator has no model)."""
    worker = request.app[WORKER_KEY]
    body = await _json_body(request)
    model, _, _ = _common(body, worker)
    documents = body.get("documents", body.get("text_2", []))
    if isinstance(documents, str):
        documents = [documents]
    if not isinstance(documents, list):
        raise ApiError(400, "documents must be a list", param="documents")
    if "rerank" in request.path:
        results = [{"index": i, "relevance_score": 0.5, "document": {"text": d}}
                   for i, d in enumerate(documents)]  # fmt: skip
        return web.json_response({"id": f"rerank-{uuid.uuid4().hex}", "model": model,
                                  "results": results, "usage": {"total_tokens": 0}})  # fmt: skip
    data = [{"index": i, "object": "score", "score": 0.5} for i in range(len(documents))]
    return web.json_response({"id": f"score-{uuid.uuid4().hex}", "object": "list",
                              "model": model, "data": data, "usage": {}})  # fmt: skip


async def models(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    s = worker.settings
    card = {"id": s.model, "object": "model", "created": 0, "owned_by": "vllm",
            "root": s.model, "parent": None, "max_model_len": s.max_model_len}  # fmt: skip
    cards = [card] + [
        {**card, "id": a, "root": f"/adapters/{a}", "parent": s.model} for a in s.adapters
    ]
    return web.json_response({"object": "list", "data": cards})


async def health(request: web.Request) -> web.Response:
    if request.app[WORKER_KEY].is_down:
        raise ApiError(503, "the engine is restarting", "ServiceUnavailableError")
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    body = render_metrics(worker.registry).encode()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4,
                                            "X-Content-Type-Options": "nosniff"})  # fmt: skip


async def reset_prefix_cache(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    if not worker.engine.reset_prefix_cache():
        raise ApiError(
            409, "cannot reset the prefix cache while requests hold blocks", "ConflictError"
        )
    return web.json_response({"ok": True})


def _query_number(request: web.Request, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a number", param=name) from None
    if value < 0:
        raise ApiError(400, f"{name} must be >= 0", param=name)
    return value


async def admin_restart(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    down_s = _query_number(request, "down_s", 0.0)
    aborted = worker.restart(down_s)
    if down_s > 0:
        # Answer first: going down stops the listener this response goes out on.
        worker.spawn(worker.go_down(down_s))
    return web.json_response({"ok": True, "down_s": down_s, "aborted": aborted})


async def admin_drop_events(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    if worker.publisher is None:
        raise ApiError(409, "KV events are off on this worker", "ConflictError")
    count = int(_query_number(request, "count", 1))
    keep = request.query.get("replay", "1") not in ("0", "false", "no")
    worker.publisher.drop_next(count, keep_in_replay=keep)
    return web.json_response({"ok": True, "count": count, "replay": keep,
                              "next_seq": worker.publisher.next_seq})  # fmt: skip


async def admin_pd_fault(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    mode = request.query.get("mode", "")
    if mode not in ("omit", "malformed", "fail", ""):
        raise ApiError(400, "mode must be omit, malformed or fail", param="mode")
    count = int(_query_number(request, "count", 1))
    worker.pd_fault = (mode, count if mode else 0)
    return web.json_response({"ok": True, "mode": mode, "count": count})


async def admin_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[WORKER_KEY].state())


@web.middleware
async def _errors_and_header(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    worker_id = request.app[WORKER_KEY].worker_id
    try:
        resp = await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status, headers={WORKER_HEADER: worker_id})
    if not resp.prepared:
        resp.headers[WORKER_HEADER] = worker_id
    return resp


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    worker = app[WORKER_KEY]
    task = asyncio.create_task(worker.engine.run(), name=f"engine-{worker.worker_id}")
    yield
    worker.engine.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _publisher_ctx(app: web.Application) -> AsyncIterator[None]:
    publisher = app[WORKER_KEY].publisher
    if publisher is None:
        yield
        return
    await publisher.start()
    yield
    await publisher.close()


def create_worker_app(worker: SimWorker) -> web.Application:
    """The aiohttp application of one worker (the engine and publisher run in cleanup_ctx)."""
    app = web.Application(middlewares=[_errors_and_header], client_max_size=64 * 1024**2)
    app[WORKER_KEY] = worker
    app.cleanup_ctx.append(_publisher_ctx)
    app.cleanup_ctx.append(_engine_ctx)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/tokenize", tokenize_endpoint)
    app.router.add_post("/detokenize", detokenize_endpoint)
    for path in ("/v1/score", "/score", "/v1/rerank", "/rerank", "/v2/rerank"):
        app.router.add_post(path, score)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    app.router.add_post("/admin/reset_prefix_cache", reset_prefix_cache)
    app.router.add_post("/admin/restart", admin_restart)
    app.router.add_post("/admin/drop_events", admin_drop_events)
    app.router.add_get("/admin/state", admin_state)
    app.router.add_post("/admin/pd_fault", admin_pd_fault)
    return app
