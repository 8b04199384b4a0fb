"""A fake vLLM worker for the tests: a small aiohttp app on loopback.

It speaks the parts of vLLM's OpenAI server the router touches: ``/v1/completions`` and
``/v1/chat/completions`` (JSON or SSE, ``usage.prompt_tokens_details.cached_tokens`` from its
own prefix cache model), ``/health``, and ``/metrics`` with ``vllm:cache_config_info``. Tests
inject faults per request and read what it received.

    async with FakeWorker(model="m") as w:
        w.faults.append("reset")      # the next request: connection closed before a byte
        ... w.url, w.requests, w.cancelled ...

Unlike the simulator (kvrouter/sim/worker.py), which models a GPU's KV cache and timing, it
answers at once and does what a test tells it: fail the next request in a given way, list
given models and adapters, or go unhealthy. (`kvrouter bench router` uses
kvrouter/bench/canned_worker.py instead.)
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from kvrouter.index.hashing import BlockHasher
from router_node.request import PromptTokenizer

# Faults, consumed one per request from FakeWorker.faults:
#   "reset"     close the connection before answering (the router retries elsewhere)
#   "503"/"500" answer with that status
#   "midstream" stream two chunks, then drop the connection (the router ends the stream)
#   "hang"      never answer (until the client gives up)
FAULTS = ("reset", "500", "503", "midstream", "hang")


@dataclass
class FakeWorker:
    model: str = "test-model"
    block_size: int = 16
    num_gpu_blocks: int = 1000
    host: str = "127.0.0.1"
    port: int = 0
    tokenizer: PromptTokenizer | None = None
    output_tokens: int = 4
    token_delay: float = 0.0
    """Seconds between streamed chunks."""
    response_delay: float = 0.0
    """Seconds before a non-streaming answer."""
    healthy: bool = True
    model_list: tuple[str, ...] | None = None
    """Models it lists on ``/v1/models`` and accepts (others get vLLM's 404); None = no
    ``/v1/models`` (404) and any model accepted."""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapter -> base model, listed with their ``parent`` (add to `model_list` too)."""
    faults: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    cancelled: int = 0
    completed: int = 0
    _cache: set[int] = field(default_factory=set)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def id(self) -> str:
        """The id a router derives from this worker's URL."""
        return f"{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/load_lora_adapter", self._load_lora)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> FakeWorker:
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        """Stop listening (connections are refused until `start()` again on the same port)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeWorker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def served(self, path: str | None = None) -> int:
        return sum(1 for r in self.requests if path is None or r["path"] == path)

    # -- handlers ------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({}, status=200 if self.healthy else 503)

    async def _models(self, request: web.Request) -> web.Response:
        if self.model_list is None:
            return web.json_response({"error": "not found"}, status=404)
        data = [
            {
                "id": m,
                "object": "model",
                "created": 0,
                "owned_by": "vllm",
                "root": f"/adapters/{m}" if m in self.adapters else m,
                "parent": self.adapters.get(m),
            }
            for m in self.model_list
        ]
        return web.json_response({"object": "list", "data": data})

    async def _load_lora(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body["lora_name"]
        self.requests.append({"path": request.path, "body": body, "headers": {}})
        if self.model_list is not None and name in self.model_list:
            return web.Response(
                status=400, text=f"The lora adapter '{name}' has already been loaded."
            )
        base = next((m for m in self.model_list or () if m not in self.adapters), self.model)
        self.adapters[name] = base
        if self.model_list is not None:
            self.model_list = (*self.model_list, name)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _metrics(self, request: web.Request) -> web.Response:
        text = (
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
            "# TYPE vllm:cache_config_info gauge\n"
            f'vllm:cache_config_info{{block_size="{self.block_size}",cache_dtype="auto",'
            f'enable_prefix_caching="True",num_gpu_blocks="{self.num_gpu_blocks}"}} 1.0\n'
        )
        return web.Response(text=text, content_type="text/plain")

    def _prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            if self.tokenizer is not None:
                return self.tokenizer.encode_chat(body["messages"])
            text = json.dumps(body["messages"])
            return [b for b in text.encode()]
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.tokenizer is not None:
                return self.tokenizer.encode_prompt(prompt)
            return list(prompt.encode())
        return list(prompt)

    def _cached_tokens(self, ids: list[int], model: str | None = None) -> int:
        """Prefix-cache hit as vLLM reports it: full blocks, at most n - 1 tokens. An
        adapter's blocks are its own (the engine folds the adapter into its block hashes)."""
        model = model or self.model
        parent = self.adapters.get(model)
        hasher = BlockHasher(parent or model, self.block_size)
        keys = hasher.keys(ids, lora_name=model if parent else None)
        hit = 0
        for k in keys:
            if k not in self._cache:
                break
            hit += 1
        self._cache.update(keys)
        return min(hit, max(0, (len(ids) - 1) // self.block_size)) * self.block_size

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        chat = request.path.endswith("/chat/completions")
        body = json.loads(raw)
        record: dict[str, Any] = {
            "path": request.path,
            "body": body,
            "headers": dict(request.headers),
        }
        self.requests.append(record)
        fault = self.faults.pop(0) if self.faults else None
        if fault == "reset":
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(3600)  # the handler is cancelled when the connection drops
        if fault in ("500", "503"):
            return web.json_response(
                {"error": {"message": "injected", "type": "server_error", "code": int(fault)}},
                status=int(fault),
            )
        if fault == "hang":
            await asyncio.sleep(3600)
        if self.model_list is not None and body.get("model") not in self.model_list:
            return web.json_response(
                {
                    "error": {
                        "message": f"The model `{body.get('model')}` does not exist.",
                        "type": "NotFoundError",
                        "param": None,
                        "code": 404,
                    }
                },
                status=404,
            )
        ids = self._prompt_ids(body, chat)
        listed = self.model_list is not None
        cached = self._cached_tokens(ids, body.get("model") if listed else None)
        record["prompt_tokens"] = len(ids)
        record["cached_tokens"] = cached
        n_out = int(
            body.get("max_tokens") or body.get("max_completion_tokens") or self.output_tokens
        )
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": n_out,
            "total_tokens": len(ids) + n_out,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{len(self.requests)}"
        created = int(time.time())
        if not body.get("stream"):
            try:
                await asyncio.sleep(self.response_delay)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            text = " tok" * n_out
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length",
                }
            else:
                choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
            self.completed += 1
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": body["model"],
                    "choices": [choice],
                    "usage": usage,
                }
            )
        return await self._stream(request, body, chat, rid, created, n_out, usage, fault, record)

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        chat: bool,
        rid: str,
        created: int,
        n_out: int,
        usage: dict[str, Any],
        fault: str | None,
        record: dict[str, Any],
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        sent = bytearray()
        record["sent"] = sent
        write_raw = resp.write

        async def write(data: bytes) -> None:
            sent.extend(data)  # what went on the wire, for pass-through tests
            await write_raw(data)

        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict[str, Any], use: dict[str, Any] | None = None) -> bytes:
            chunk: dict[str, Any] = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": body["model"],
                "choices": [choice],
            }
            if use is not None:
                chunk["usage"] = use
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        try:
            if chat:
                await write(
                    event(
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                    )
                )
            for i in range(n_out):
                if fault == "midstream" and i == 2:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                last = i == n_out - 1
                if chat:
                    choice = {
                        "index": 0,
                        "delta": {"content": " tok"},
                        "finish_reason": "length" if last else None,
                    }
                else:
                    choice = {
                        "index": 0,
                        "text": " tok",
                        "finish_reason": "length" if last else None,
                        "logprobs": None,
                    }
                await write(event(choice))
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
            opts = body.get("stream_options") or {}
            if opts.get("include_usage"):
                chunk = {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": body["model"],
                    "choices": [],
                    "usage": usage,
                }
                await write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.cancelled += 1
            raise
        self.completed += 1
        return resp


async def route_depths(
    router_url: str, model: str, prompt: list[int], admin_token: str
) -> dict[str, int]:
    """Each worker's matched depth in blocks for `prompt` under `model`, as the router's
    ``/debug/route`` reports it. Raises AssertionError unless the router answers 200."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            router_url + "/debug/route",
            json={"model": model, "prompt": prompt},
            headers={"Authorization": f"Bearer {admin_token}"},
        ) as r,
    ):
        if r.status != 200:
            raise AssertionError(f"/debug/route answered {r.status}: {await r.text()}")
        body = await r.json()
    return {w["worker"]: int(w["depth_blocks"]) for w in body["workers"]}
