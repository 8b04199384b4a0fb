"""End to end: the official openai client sends content-part messages, tool calls and a
Responses API request through the router to simulated vLLM workers whose prompt token
counts come from the reference (transformers' apply_chat_template plus vLLM's request
rules, tests/tokenizer/vllm_reference.py); the router's count must equal the worker's.
And with the wrong tokenizer, the mismatch metric fires and the log names model and
endpoint."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from openai import AsyncOpenAI
from transformers import PreTrainedTokenizerBase

from kvrouter.tokenizer import Tokenizer
from kvrouter.tokenizer.testing import build_test_tokenizer
from router_node.app import RouterServer
from tests.router.conftest import MODEL, get_json, openai_client, post, settings_for
from tests.support.metrics import parse
from tests.tokenizer import vllm_reference as ref

pytestmark = pytest.mark.redis


@dataclass
class ReferenceWorker:
    """A simulated vLLM worker: it answers chat, completions and responses with a canned
    text and the usage vLLM would report, its prompt tokens computed by the reference."""

    hf: PreTrainedTokenizerBase
    content_format: str
    host: str = "127.0.0.1"
    port: int = 0
    counts: list[tuple[str, int]] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _chat_ids(self, body: dict[str, Any]) -> list[int]:
        return ref.chat_ids(self.hf, body, self.content_format)

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            n = len(self._chat_ids(body))
        except KeyError as exc:  # a media part: this text-only worker answers 400, as vLLM
            error = {"message": f"unsupported content part {exc}", "type": "BadRequestError"}
            return web.json_response({"error": error}, status=400)
        self.counts.append(("chat", n))
        if body.get("stream"):
            return await self._stream_chat(request, body, n)
        message = {"role": "assistant", "content": "ok"}
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1},
            }
        )

    async def _stream_chat(
        self, request: web.Request, body: dict[str, Any], n: int
    ) -> web.StreamResponse:
        """SSE as vLLM streams it; the usage chunk is written in two pieces split inside
        "prompt_tokens", as a network read may split it."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        envelope = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 0,
                    "model": body["model"]}  # fmt: skip
        delta = {"index": 0, "delta": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}  # fmt: skip
        await resp.write(
            b"data: " + json.dumps({**envelope, "choices": [delta]}).encode() + b"\n\n"
        )
        usage = {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}
        last = b"data: " + json.dumps({**envelope, "choices": [], "usage": usage}).encode()
        cut = last.index(b"prompt_tok")
        await resp.write(last[:cut])
        await asyncio.sleep(0.05)
        await resp.write(last[cut:] + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "prompt" not in body:  # prompt_embeds: vLLM refuses them unless enabled
            error = {"message": "prompt is required", "type": "BadRequestError", "code": 400}
            return web.json_response({"object": "error", **error}, status=400)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        add = body.get("add_special_tokens", True)
        n = sum(len(ref.completion_ids(self.hf, p, add)) for p in prompts)
        self.counts.append(("completions", n))
        choices = [{"index": i, "text": "ok", "finish_reason": "stop"} for i in range(len(prompts))]
        return web.json_response(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": choices,
                "usage": {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1},
            }
        )

    async def responses(self, request: web.Request) -> web.Response:
        body = await request.json()
        chat = {
            "messages": ref.responses_messages(body),
            "tools": ref.responses_tools(body.get("tools")),
        }
        n = len(self._chat_ids(chat))
        self.counts.append(("responses", n))
        text = {"type": "output_text", "text": "ok", "annotations": []}
        return web.json_response(
            {
                "id": f"resp_{uuid.uuid4().hex}",
                "object": "response",
                "created_at": int(time.time()),
                "model": body["model"],
                "status": "completed",
                "output": [
                    {
                        "id": f"msg_{uuid.uuid4().hex}",
                        "type": "message",
                        "role": "assistant",
                        "status": "completed",
                        "content": [text],
                    }
                ],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": {
                    "input_tokens": n,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": 1,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": n + 1,
                },
            }
        )

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        n = sum(len(ref.completion_ids(self.hf, t, True)) for t in inputs)
        self.counts.append(("embeddings", n))
        data = [
            {"object": "embedding", "index": i, "embedding": [0.5, 0.25]}
            for i in range(len(inputs))
        ]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": n, "total_tokens": n},
            }
        )

    async def echo(self, request: web.Request) -> web.Response:
        """/tokenize, /detokenize, /v1/score, /v1/rerank: say which path was reached."""
        self.counts.append((request.path, 0))
        return web.json_response({"path": request.path, "body": await request.json()})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/embeddings", self.embeddings)
        for path in ("/tokenize", "/detokenize", "/v1/score", "/v1/rerank", "/rerank"):
            app.router.add_post(path, self.echo)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/responses", self.responses)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_tokenizer(tmp_path_factory.mktemp("qwen"), "qwen", vocab_size=2000)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_tokenizer(tmp_path_factory.mktemp("llama"), "llama3", vocab_size=2000)


Start = Callable[[Path, str, Path], Awaitable[tuple[RouterServer, ReferenceWorker, AsyncOpenAI]]]


@pytest.fixture
async def stack(redis_url: str, redis_client: Any) -> AsyncIterator[Start]:
    """Start a reference worker tokenizing with `worker_dir`'s files and a router loaded
    with `router_dir`'s (the same directory unless a test wants a wrong tokenizer)."""
    started: list[Any] = []

    async def start(
        worker_dir: Path, content_format: str, router_dir: Path
    ) -> tuple[RouterServer, ReferenceWorker, AsyncOpenAI]:
        worker = ReferenceWorker(ref.load(worker_dir), content_format)
        await worker.start()
        started.append(worker)
        settings = settings_for(redis_url, [worker])  # type: ignore[list-item]
        server = RouterServer(settings, tokenizer=Tokenizer.load(router_dir))
        await server.start()
        started.append(server)
        client = openai_client(server)
        started.append(client)
        return server, worker, client

    yield start
    for item in reversed(started):
        if isinstance(item, ReferenceWorker):
            await item.stop()
        else:
            await item.close()  # the openai client, then the router


def metric(text: str, name: str, **labels: str) -> float:
    """A counter's value for `labels` (the model by default); 0 when it never counted."""
    scrape = parse(text)
    labels = labels or {"model": MODEL}
    return scrape.value(name, **labels) if scrape.has(name, **labels) else 0.0


async def metrics_text(server: RouterServer) -> str:
    status, _ = await get_json(server.url + "/health")
    assert status == 200
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(server.url + "/metrics") as r:
        return await r.text()


TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <now> & later",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CONVERSATION: list[Any] = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is the weather"},
            {"type": "text", "text": "in Paris, today?"},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "21 C"}]},
]


@pytest.mark.parametrize(("kind", "content_format"), [("qwen", "string"), ("llama3", "openai")])
async def test_router_counts_what_the_worker_counts(
    stack: Start, qwen_dir: Path, llama_dir: Path, kind: str, content_format: str
) -> None:
    directory = qwen_dir if kind == "qwen" else llama_dir
    server, worker, client = await stack(directory, content_format, directory)

    chat = await client.chat.completions.create(model=MODEL, messages=CONVERSATION, tools=TOOLS)
    assert chat.usage is not None
    plain = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello <b>there</b> 🙂"}]
    )
    assert plain.usage is not None
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=CONVERSATION,
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed = [chunk async for chunk in stream]
    assert streamed[-1].usage is not None
    assert streamed[-1].usage.prompt_tokens == chat.usage.prompt_tokens
    completion = await client.completions.create(
        model=MODEL, prompt=["Once upon a time", "résumé: 東京"], max_tokens=1
    )
    assert completion.usage is not None
    response = await client.responses.create(
        model=MODEL,
        instructions="Answer in one word.",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
            {
                "type": "function_call",
                "call_id": "c9",
                "name": "get_weather",
                "arguments": '{"city": "Oslo"}',
            },
            {"type": "function_call_output", "call_id": "c9", "output": "-3 C"},
        ],
        tools=[
            {
                "type": "function",
                "name": "get_weather",
                "description": "Weather",
                "parameters": {"type": "object", "properties": {}},
                "strict": False,
            }
        ],
    )
    assert response.usage is not None and response.usage.input_tokens > 0

    text = await metrics_text(server)
    kinds = [k for k, _ in worker.counts]
    assert kinds == ["chat", "chat", "chat", "completions", "responses"]
    # Every answer was compared with the router's own count (the streamed one from its
    # usage chunk, split across two reads), and none differed.
    assert metric(text, "kvrouter_tokenization_checked_total") == 5
    assert metric(text, "kvrouter_tokenization_mismatch_total") == 0
    # And the router's count is the tokenizer's own answer for the same body.
    router_tok = Tokenizer.load(directory)
    router_count = len(router_tok.encode_chat_request({"messages": CONVERSATION, "tools": TOOLS}))
    assert router_count == worker.counts[0][1] == chat.usage.prompt_tokens


async def test_mismatch_metric_fires_with_the_wrong_tokenizer(
    stack: Start, qwen_dir: Path, llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The workers run the Qwen-style model; the router was given the Llama-3 one.
    server, _, client = await stack(qwen_dir, "string", llama_dir)
    caplog.set_level(logging.WARNING, logger="router_node.proxy")
    for i in range(7):
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"question {i}"}]
        )
    text = await metrics_text(server)
    assert metric(text, "kvrouter_tokenization_checked_total") == 7
    assert metric(text, "kvrouter_tokenization_mismatch_total") == 7
    logged = [r.getMessage() for r in caplog.records if "tokenization mismatch" in r.getMessage()]
    assert len(logged) == 5, "the first few are logged, the rest only counted"
    assert f"model {MODEL}, endpoint chat" in logged[0]


async def post_json(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


async def test_more_endpoints_reach_a_worker_and_others_get_a_clear_404(
    stack: Start, qwen_dir: Path
) -> None:
    server, worker, client = await stack(qwen_dir, "string", qwen_dir)
    emb = await client.embeddings.create(model=MODEL, input=["the router cache", "東京"])
    assert emb.usage.prompt_tokens == worker.counts[-1][1] > 0
    for path in ("/tokenize", "/detokenize", "/v1/score", "/v1/rerank", "/rerank"):
        status, headers, body = await post_json(
            server.url + path, {"model": MODEL, "prompt": "x", "query": "q", "documents": ["d"]}
        )
        assert status == 200 and body["path"] == path
        assert headers["x-kvrouter-worker"] == f"127.0.0.1:{worker.port}"
    status, _, body = await post_json(server.url + "/v1/audio/speech", {"model": MODEL})
    assert status == 404
    assert body["error"]["code"] == "unknown_endpoint"
    assert "/v1/audio/speech" in body["error"]["message"]
    assert worker.counts[-1][0] == "/rerank", "the unknown path never reached a worker"
    status, _, body = await post_json(server.url + "/v1/score", {"model": "nope"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    text = await metrics_text(server)
    assert metric(text, "kvrouter_tokenization_checked_total") == 1  # the embeddings call
    assert metric(text, "kvrouter_tokenization_mismatch_total") == 0


async def test_content_the_router_cannot_tokenize_routes_on_the_text_before_it(
    stack: Start, qwen_dir: Path
) -> None:
    server, _, _ = await stack(qwen_dir, "string", qwen_dir)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    history: list[Any] = [
        {"role": "system", "content": "You read pictures."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    body = {
        "model": MODEL,
        "messages": [
            *history,
            {"role": "user", "content": [{"type": "text", "text": "See"}, image]},
        ],
    }
    status, _, answer = await post_json(server.url + "/v1/chat/completions", body)
    # The reference worker is text-only, like vLLM serving a text model: it fails the
    # request; what matters here is what the router routed on.
    assert status == 400, answer
    text = await metrics_text(server)
    inexact = "kvrouter_tokenization_inexact_total"
    assert metric(text, inexact, endpoint="chat", reason="image_url") == 1
    assert metric(text, "kvrouter_tokenization_checked_total") == 0, "not compared: inexact"
    # The keys it routed on are the exact prefix: the history, rendered without a
    # generation prompt, is where the engine's prompt starts too.
    tok = Tokenizer.load(qwen_dir)
    prefix = tok.encode_chat_request({"messages": history, "add_generation_prompt": False})
    full = ref.chat_ids(
        ref.load(qwen_dir),
        {"messages": [*history, {"role": "user", "content": "<image>\nSee"}]},
        "string",
    )
    assert full[: len(prefix)] == prefix
    cases = {
        "prompt_embeds": ("/v1/completions", {"model": MODEL, "prompt_embeds": "AAAA"}),
        "previous_response_id": (
            "/v1/responses",
            {"model": MODEL, "input": "and then?", "previous_response_id": "resp_1"},
        ),
        "truncate_prompt_tokens": (
            "/v1/completions",
            {"model": MODEL, "prompt": "a long story", "truncate_prompt_tokens": 2},
        ),
        "unknown_part": (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "x-new"}]}]},
        ),
    }
    for reason, (path, req) in cases.items():
        await post(server.url + path, json=req)
        text = await metrics_text(server)
        assert metric(text, inexact, reason=reason) == 1, reason


def test_content_format_overridable_per_model(tmp_path: Path, qwen_dir: Path) -> None:
    """An engine started with --chat-template-content-format: the [[models]] entry says so."""
    from router_node.app import load_tokenizer
    from router_node.models import ModelCatalogue, ModelConfig

    config = tmp_path / "c.toml"
    config.write_text(
        f'[[models]]\nname = "q"\ntokenizer = "{qwen_dir}"\n'
        'chat_template_content_format = "openai"\n',
        encoding="utf-8",
    )
    from router_node.models import load_config_file

    entry = load_config_file(str(config)).models[0]
    base = ModelCatalogue.build(["q", "plain"], [entry, ModelConfig("plain")]).bases
    assert (base["q"].content_format, base["plain"].content_format) == ("openai", "auto")
    detected = load_tokenizer(str(qwen_dir))
    forced = load_tokenizer(str(qwen_dir), "", "openai")
    assert isinstance(detected, Tokenizer) and isinstance(forced, Tokenizer)
    assert (detected.content_format(), forced.content_format()) == ("string", "openai")
    # In "openai" format the Qwen-style template meets a list and cannot concatenate it: the
    # same request the detected format serves is a 400 there, as it is on such an engine.
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert detected.encode_chat_request({"messages": parts})
    with pytest.raises(Exception, match="chat template error"):
        forced.encode_chat_request({"messages": parts})
