"""OpenTelemetry tracing (router_node/tracing.py): the span tree of a chat request that
retried once, recorded by the SDK's in-memory exporter, and the W3C traceparent the workers
receive. Real router, real Redis, fake vLLM workers, the official openai client."""

from __future__ import annotations

import random
from typing import Any

import pytest
from openai import AsyncOpenAI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from router_node.app import RouterServer
from router_node.settings import otel_configured
from tests.router.conftest import MODEL, openai_client, settings_for, settle
from tests.support.fake_worker import FakeWorker

pytestmark = pytest.mark.redis

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"
MESSAGES = [
    {"role": "user", "content": "a question about the cache, long enough to fill blocks " * 8}
]


def _tree(spans: list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    by_parent: dict[str, list[ReadableSpan]] = {}
    for s in spans:
        parent = f"{s.parent.span_id:016x}" if s.parent else "-"
        by_parent.setdefault(parent, []).append(s)
    return by_parent


async def test_span_tree_of_a_chat_request_that_retried_once(
    redis_url: str, redis_client: Any, tokenizer: Any, workers: list[FakeWorker]
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    two = workers[:2]
    server = RouterServer(
        settings_for(redis_url, two), tokenizer=tokenizer, rng=random.Random(1),
        tracer_provider=provider,
    )  # fmt: skip
    await server.start()
    try:
        client = openai_client(server)
        # A first request puts the prompt's blocks on one worker, so the second ranks it
        # first; that worker then fails once (503) and the request moves to the other.
        first = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=2
        )
        holder = first.headers["x-kvrouter-worker"]
        await settle(server)
        failing = next(w for w in two if w.id == holder)
        other = next(w for w in two if w.id != holder)
        failing.faults.append("503")
        exporter.clear()
        second = await client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=2,
            extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"},
        )
        assert second.headers["x-kvrouter-worker"] == other.id
        await settle(server)
    finally:
        await server.close()

    spans = exporter.get_finished_spans()
    tree = _tree(list(spans))
    # The request span continues the client's trace.
    (root,) = tree[CLIENT_PARENT]
    assert root.name == "POST /v1/chat/completions" and root.kind == SpanKind.SERVER
    assert {f"{s.context.trace_id:032x}" for s in spans} == {CLIENT_TRACE}
    attrs = dict(root.attributes or {})
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["kvrouter.decision.reason"] == "prefix"
    assert attrs["kvrouter.decision.worker"] == failing.id
    assert attrs["kvrouter.worker"] == other.id
    assert attrs["kvrouter.matched_tokens"] > 0
    assert attrs["http.response.status_code"] == 200
    children = tree[f"{root.context.span_id:016x}"]
    names = [s.name for s in sorted(children, key=lambda s: s.start_time or 0)]
    assert names == ["parse", "tokenize", "lookup", "score", "attempt", "attempt"]
    attempts = sorted((s for s in children if s.name == "attempt"), key=lambda s: s.start_time or 0)
    a1, a2 = (dict(a.attributes or {}) for a in attempts)
    assert (a1["kvrouter.worker"], a1["kvrouter.attempt"], a1["http.response.status_code"]) == (
        failing.id, 1, 502,
    )  # fmt: skip
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert (a2["kvrouter.worker"], a2["kvrouter.attempt"], a2["http.response.status_code"]) == (
        other.id, 2, 200,
    )  # fmt: skip
    assert all(a.kind == SpanKind.CLIENT for a in attempts)
    # Each attempt has its record/lease round trip as a child.
    for a in attempts:
        (lease,) = tree[f"{a.context.span_id:016x}"]
        assert lease.name == "record_lease"
        assert (
            dict(lease.attributes or {})["kvrouter.worker"]
            == dict(a.attributes or {})["kvrouter.worker"]
        )
    # Each worker got a traceparent naming the attempt that called it (vLLM continues there).
    for worker, attempt in ((failing, attempts[0]), (other, attempts[1])):
        sent = {k.lower(): v for k, v in worker.requests[-1]["headers"].items()}["traceparent"]
        assert sent == f"00-{CLIENT_TRACE}-{attempt.context.span_id:016x}-01"


async def test_without_tracing_the_clients_traceparent_passes_through(
    start_router: Any, workers: list[FakeWorker]
) -> None:
    router = await start_router(workers[:1])
    header = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
    await openai_client(router).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=2, extra_headers={"traceparent": header}
    )
    sent = {k.lower(): v for k, v in workers[0].requests[-1]["headers"].items()}
    assert sent["traceparent"] == header


def test_tracing_is_off_unless_otel_variables_ask() -> None:
    assert not otel_configured({})
    assert otel_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert otel_configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert not otel_configured({**on, "OTEL_SDK_DISABLED": "true"})
    assert not otel_configured({**on, "OTEL_TRACES_EXPORTER": "none"})


async def test_kvrouter_serve_exports_spans_over_otlp(tokenizer: Any) -> None:
    """`kvrouter serve` with OTEL_EXPORTER_OTLP_ENDPOINT set sends its spans over OTLP/HTTP
    (protobuf) to a collector: here a small aiohttp receiver that decodes them."""
    import asyncio
    import os
    import sys

    import aiohttp
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from kvrouter.redisproc import free_port

    received: list[str] = []

    async def traces(request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest.FromString(await request.read())
        for rs in msg.resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}
            assert service["service.name"] == "kvrouter-router"
            received.extend(s.name for ss in rs.scope_spans for s in ss.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    collector = runner.addresses[0][1]
    worker = FakeWorker(model=MODEL, tokenizer=tokenizer)
    await worker.start()
    port = free_port()
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "KVR_REDIS_URL": "",
        "KVR_MODEL": MODEL,
        "KVR_WORKERS": worker.url,
        "KVR_HEALTH_INTERVAL_S": "0",
        "KVR_HOST": "127.0.0.1",
        "KVR_PORT": str(port),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter.cli", "serve", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            body = {"model": MODEL, "prompt": [1, 2, 3, 4], "max_tokens": 2}
            async with s.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200
        for _ in range(100):
            if "POST /v1/completions" in received:
                break
            await asyncio.sleep(0.05)
        assert {"POST /v1/completions", "parse", "tokenize", "score", "attempt"} <= set(received)
    finally:
        proc.terminate()
        await proc.wait()
        await worker.stop()
        await runner.cleanup()


async def test_a_split_request_traces_its_prefill_leg(redis_url: str, redis_client: Any) -> None:
    """P/D requests on a simulated 2 prefill + 1 decode fleet: each prefill worker tried gets a
    ``prefill`` span (kind CLIENT, leg prefill, its status, a ``record_lease`` child; the
    traceparent the worker receives names it), then the decode leg's ``attempt``."""
    from kvrouter.sim.fleet import SimFleet
    from kvrouter.sim.settings import SimSettings
    from router_node.settings import RouterSettings, WorkerSpec

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sim = SimSettings(
        workers=3, prefill_workers=2, capacity_tokens=16384, time_scale=200.0,
        base_port=0, kv_events="off",
    )  # fmt: skip
    parents = ("00f067aa0ba90201", "00f067aa0ba90202")
    async with SimFleet(sim) as fleet:
        assert fleet.info is not None
        roles = {"sim-0": "prefill", "sim-1": "prefill", "sim-2": "decode"}
        specs = tuple(WorkerSpec.parse(f"{w.id}={w.url}@{roles[w.id]}") for w in fleet.info.workers)
        settings = RouterSettings(
            host="127.0.0.1", port=0, redis_url=redis_url, models=(sim.model,), workers=specs,
            health_interval_s=0, discovery="static", pd_min_prefill_tokens=64,
            eject_failures=10,
        )  # fmt: skip
        sent: dict[str, list[str]] = {}
        async with RouterServer(settings, tracer_provider=provider) as router:
            client = AsyncOpenAI(base_url=router.url + "/v1", api_key="k", max_retries=0)
            # The first request finds both prefill workers failing once (503): it runs whole
            # on the decode worker. The second splits.
            for w in fleet.workers[:2]:
                w.pd_fault = ("fail", 1)
            for n, parent in enumerate(parents):
                raw = await client.completions.with_raw_response.create(
                    model=sim.model,
                    prompt=list(range(1 + 1000 * n, 400 + 1000 * n)),
                    max_tokens=3,
                    extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{parent}-01"},
                )
                assert raw.headers["x-kvrouter-worker"] == "sim-2"
                assert ("x-kvrouter-prefill-worker" in raw.headers) == (n == 1)
                for w in fleet.workers[:2]:
                    if w.pd["last_prefill"] is not None:
                        sent.setdefault(w.worker_id, []).append(w.pd["last_prefill"]["traceparent"])
                        w.pd["last_prefill"] = None
                await settle(router)

    tree = _tree(list(exporter.get_finished_spans()))
    prefill_spans = []
    for n, parent in enumerate(parents):
        (root,) = tree[parent]
        children = sorted(tree[f"{root.context.span_id:016x}"], key=lambda s: s.start_time or 0)
        legs = ["prefill", "prefill"] if n == 0 else ["prefill"]
        assert [s.name for s in children] == [
            "parse",
            "tokenize",
            "lookup",
            "score",
            *legs,
            "attempt",
        ]
        for s in children[4:-1]:
            a = dict(s.attributes or {})
            assert s.kind == SpanKind.CLIENT and a["kvrouter.pd.leg"] == "prefill"
            assert a["http.response.status_code"] == (503 if n == 0 else 200)
            assert (s.status.status_code == StatusCode.ERROR) == (n == 0)
            (lease,) = tree[f"{s.context.span_id:016x}"]
            assert lease.name == "record_lease"
            prefill_spans.append(s)
        tried = [dict(s.attributes or {})["kvrouter.attempt"] for s in children[4:-1]]
        assert tried == list(range(1, len(tried) + 1))
        last = dict(children[-1].attributes or {})
        assert last["kvrouter.worker"] == "sim-2"
        # Only a decode leg (with the prefill worker's params) is marked as one.
        assert last.get("kvrouter.pd.leg") == (None if n == 0 else "decode")
    # Each prefill worker received a traceparent naming the prefill span that called it.
    names = {
        f"00-{CLIENT_TRACE}-{s.context.span_id:016x}-01": dict(s.attributes or {})[
            "kvrouter.worker"
        ]
        for s in prefill_spans
    }
    got = {tp: wid for wid, tps in sent.items() for tp in tps}
    assert got == names
