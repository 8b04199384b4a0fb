"""The simulated workers' OpenAI HTTP API, metrics and admin endpoints on real loopback ports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvrouter.sim.fleet import SimFleet, read_ready_file
from kvrouter.sim.settings import SettingsError, SimSettings
from tests.support.metrics import parse


def settings(workers: int, time_scale: float = 200.0) -> SimSettings:
    """Free ports, 256 blocks; a fast clock keeps most tests well under a second."""
    return SimSettings(
        workers=workers, capacity_tokens=4096, time_scale=time_scale, base_port=0,
        kv_events_base_port=0,
    )  # fmt: skip


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(settings(2)) as f:
        yield f


@pytest.fixture
async def slow_fleet() -> AsyncIterator[SimFleet]:
    """Real-time clock: a long request stays in flight while the test pokes at it."""
    async with SimFleet(settings(1, time_scale=1.0)) as f:
        yield f


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


def url(fleet: SimFleet, i: int = 0) -> str:
    assert fleet.info is not None
    return fleet.info.workers[i].url


async def sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """The decoded `data:` payloads of an SSE body, `[DONE]` kept as a string."""
    out: list[Any] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_completion_non_streaming_reports_cached_tokens(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    body = {"model": "sim-llama-3-8b", "prompt": list(range(1, 101)), "max_tokens": 5}
    async with http.post(url(fleet) + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["x-sim-worker"] == "sim-0"
        first = await resp.json()
    assert first["object"] == "text_completion"
    assert first["choices"][0]["finish_reason"] == "length"
    assert len(first["choices"][0]["text"]) == 5  # byte tokenizer: one char per token
    assert first["usage"] == {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "total_tokens": 105,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    async with http.post(url(fleet) + "/v1/completions", json=body) as resp:
        second = await resp.json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert second["choices"][0]["text"] == first["choices"][0]["text"]  # deterministic
    # The other worker has its own cache.
    async with http.post(url(fleet, 1) + "/v1/completions", json=body) as resp:
        other = await resp.json()
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_completion_streaming_sse_with_usage(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    body = {
        "prompt": "The quick brown fox jumps over the lazy dog.",
        "max_tokens": 40,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(url(fleet) + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await sse(resp)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 40
    assert usage_chunk["usage"]["prompt_tokens"] == 44
    text_chunks = events[:-2]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in text_chunks)
    assert "".join(c["choices"][0]["text"] for c in text_chunks).__len__() == 40
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])


async def test_chat_streaming_and_not(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi there"}]},
    ]
    body = {"messages": messages, "max_completion_tokens": 3, "stream": True}
    async with http.post(url(fleet) + "/v1/chat/completions", json=body) as resp:
        events = await sse(resp)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
    assert len(content) == 3
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    async with http.post(
        url(fleet) + "/v1/chat/completions", json={"messages": messages, "max_tokens": 3}
    ) as resp:
        full = await resp.json()
    assert full["object"] == "chat.completion"
    assert full["choices"][0]["message"]["content"] == content
    # "<|system|>\n" 11 + "You are terse.\n" 15 + "<|user|>\n" 9 + "Hi there\n" 9
    # + "<|assistant|>\n" 14 = 58 bytes; (58 - 1) // 16 = 3 blocks cached from the first call.
    assert full["usage"]["prompt_tokens"] == 58
    assert full["usage"]["prompt_tokens_details"]["cached_tokens"] == 48


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", {"prompt": "x", "model": "other"}, 404),
        ("/v1/completions", {"prompt": [1, -2]}, 400),
        ("/v1/completions", {"prompt": [1, 2.5]}, 400),
        ("/v1/completions", {"prompt": [1, "a"]}, 400),
        ("/v1/completions", {"prompt": [1, 2**32]}, 400),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
        ("/v1/completions", {"max_tokens": 3}, 400),
        ("/v1/completions", {"prompt": list(range(5000)), "max_tokens": 1}, 400),  # > cache
        ("/v1/completions", {"prompt": ["a", "b"]}, 400),
        ("/v1/chat/completions", {"messages": []}, 400),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400),
    ],
)
async def test_bad_requests_get_openai_errors(
    fleet: SimFleet, http: aiohttp.ClientSession, path: str, body: dict[str, Any], status: int
) -> None:
    async with http.post(url(fleet) + path, json=body) as resp:
        assert resp.status == status
        err = await resp.json()
    assert err["error"]["code"] == status and err["error"]["message"]


async def test_malformed_json(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    async with http.post(url(fleet) + "/v1/completions", data=b"{nope") as resp:
        assert resp.status == 400


async def test_models_health_metrics(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    async with http.get(url(fleet) + "/v1/models") as resp:
        models = await resp.json()
    assert [m["id"] for m in models["data"]] == ["sim-llama-3-8b"]
    async with http.get(url(fleet) + "/health") as resp:
        assert resp.status == 200
    body = {"prompt": list(range(1, 41)), "max_tokens": 2}
    for _ in range(2):
        async with http.post(url(fleet) + "/v1/completions", json=body) as resp:
            assert resp.status == 200
    async with http.get(url(fleet) + "/metrics") as resp:
        text = await resp.text()
    m = parse(text)
    one = {"engine": "0", "model_name": "sim-llama-3-8b"}
    assert m.value("vllm:num_requests_running", **one) == 0
    assert m.value("vllm:num_requests_waiting", **one) == 0
    assert m.value("vllm:prefix_cache_queries_total", **one) == 80
    assert m.value("vllm:prefix_cache_hits_total", **one) == 32  # (40 - 1) // 16 blocks
    assert m.value("vllm:kv_cache_usage_perc", **one) == 0
    assert m.value("vllm:gpu_cache_usage_perc", **one) == 0
    assert m.value("vllm:time_to_first_token_seconds_count", **one) == 2
    assert m.value("vllm:time_to_first_token_seconds_bucket", **one, le="+Inf") == 2
    assert m.value("vllm:cache_config_info", num_gpu_blocks="256", block_size="16") == 1
    assert m.types["vllm:time_to_first_token_seconds"] == "histogram"
    assert m.types["vllm:prefix_cache_hits_total"] == "counter"


async def test_usage_and_running_gauge_while_busy(
    slow_fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    fleet = slow_fleet
    body = {"prompt": list(range(1, 200)), "max_tokens": 3000, "stream": True}  # ~30 s
    async with http.post(url(fleet) + "/v1/completions", json=body) as resp:
        await resp.content.readline()  # first chunk: the request holds blocks now
        async with http.get(url(fleet) + "/metrics") as m:
            text = await m.text()
        assert parse(text).value("vllm:num_requests_running", model_name="sim-llama-3-8b") == 1
        async with http.post(url(fleet) + "/admin/reset_prefix_cache") as r:
            assert r.status == 409  # refused while blocks are held, like vLLM
    # Leaving the stream early aborted the request and freed its blocks.
    state: dict[str, Any] = {}
    for _ in range(100):
        async with http.get(url(fleet) + "/admin/state") as r:
            state = await r.json()
        if state["running"] == 0:
            break
        await asyncio.sleep(0.02)
    assert state["running"] == 0 and state["free_blocks"] == 256


async def test_restart_fails_inflight_requests_and_empties_cache(
    slow_fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    fleet = slow_fleet
    body = {"prompt": list(range(1, 100)), "max_tokens": 3000, "stream": True}  # ~30 s
    async with http.post(url(fleet) + "/v1/completions", json=body) as resp:
        await resp.content.readline()
        async with http.post(url(fleet) + "/admin/restart") as r:
            assert r.status == 200
            assert (await r.json())["aborted"] == 1
        events = await sse(resp)
    assert any(isinstance(e, dict) and e.get("error", {}).get("code") == 503 for e in events)
    async with http.get(url(fleet) + "/admin/state") as r:
        state = await r.json()
    assert state["cached_blocks"] == 0 and state["running"] == 0


async def test_restart_with_downtime_refuses_connections_then_comes_back(
    fleet: SimFleet,
) -> None:
    async with (
        aiohttp.ClientSession() as s1,
        s1.post(url(fleet) + "/admin/restart?down_s=0.5") as r,
    ):
        assert r.status == 200
    await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as s2:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with s2.get(url(fleet) + "/health"):
                pass
    deadline = time.monotonic() + 10
    while True:
        try:
            async with aiohttp.ClientSession() as s3, s3.get(url(fleet) + "/health") as r:
                if r.status == 200:
                    break
        except aiohttp.ClientConnectionError:
            pass
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


def test_settings_errors_name_flag_and_variable() -> None:
    with pytest.raises(SettingsError, match="--workers / KVR_SIM_WORKERS"):
        SimSettings(workers=0)
    with pytest.raises(SettingsError, match="KVR_SIM_TIME_SCALE"):
        SimSettings.from_env({"KVR_SIM_TIME_SCALE": "fast"})
    with pytest.raises(SettingsError, match="KVR_SIM_KV_EVENTS"):
        SimSettings.from_env({"KVR_SIM_KV_EVENTS": "json"})
    s = SimSettings.from_env({"KVR_SIM_WORKERS": "3", "KVR_SIM_MODEL": "m"}, workers=5)
    assert (s.workers, s.model) == (5, "m")  # flags win over the environment
    assert SimSettings().num_gpu_blocks == 26_624


def test_cli_subprocess_ready_file_and_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env["KVR_SIM_WORKERS"] = "2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvrouter", "sim", "--base-port", "0", "--kv-events",
         "positional", "--kv-events-base-port", "0", "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        info = read_ready_file(ready)
        assert [w.id for w in info.workers] == ["sim-0", "sim-1"]
        assert all(w.events_endpoint and w.replay_endpoint for w in info.workers)
        assert info.num_gpu_blocks == 26_624 and info.kv_events == "positional"
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == info.to_json()
        import urllib.request

        with urllib.request.urlopen(info.workers[1].url + "/health", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_cli_rejects_bad_settings() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-m", "kvrouter", "sim", "--capacity-tokens", "3"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--capacity-tokens / KVR_SIM_CAPACITY_TOKENS" in out.stderr


async def test_responses_embeddings_tokenize_and_scoring(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    """The endpoints a router routes beyond chat and completions, in vLLM's shapes."""
    base, model = url(fleet), "sim-llama-3-8b"
    body: dict[str, Any] = {"model": model, "instructions": "Be brief.", "input": "Hi",
                            "max_output_tokens": 3}  # fmt: skip
    async with http.post(base + "/v1/responses", json=body) as resp:
        assert resp.status == 200
        out = await resp.json()
    # The Byte tokenizer renders the chat vLLM makes of it: a system and a user turn.
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    async with http.post(base + "/tokenize", json={"model": model, "messages": chat}) as resp:
        count = (await resp.json())["count"]
    assert out["object"] == "response" and out["usage"]["input_tokens"] == count
    assert out["usage"]["output_tokens"] == 3
    assert out["output"][0]["content"][0]["type"] == "output_text"
    for bad, status in (({**body, "stream": True}, 400), ({**body, "input": 3}, 400),
                        ({**body, "previous_response_id": "resp_x"}, 404)):  # fmt: skip
        async with http.post(base + "/v1/responses", json=bad) as resp:
            assert resp.status == status
            assert "error" in await resp.json()

    async with http.post(base + "/v1/embeddings", json={"model": model, "input": ["ab", "c"]}) as r:
        emb = await r.json()
    assert len(emb["data"]) == 2 and emb["usage"]["prompt_tokens"] == 3
    async with http.post(base + "/tokenize", json={"model": model, "prompt": "héllo"}) as r:
        tokens = (await r.json())["tokens"]
    assert tokens == list("héllo".encode())
    async with http.post(base + "/detokenize", json={"model": model, "tokens": tokens}) as r:
        assert (await r.json())["prompt"] == "héllo"
    rerank = {"model": model, "query": "q", "documents": ["a", "b"]}
    async with http.post(base + "/v1/rerank", json=rerank) as r:
        assert [x["index"] for x in (await r.json())["results"]] == [0, 1]
    async with http.post(base + "/v1/score", json={"model": model, "text_1": "q",
                                                   "text_2": ["a"]}) as r:  # fmt: skip
        assert (await r.json())["data"][0]["object"] == "score"
    async with http.post(base + "/v1/embeddings", json={"model": model, "input": 7}) as r:
        assert r.status == 400
    # Not a list of messages: 400 as vLLM answers, never a 500 (the hostile-input fuzz found
    # {"messages": null} crashing the handler).
    for messages in (None, "hi", 3):
        async with http.post(base + "/tokenize", json={"model": model, "messages": messages}) as r:
            assert r.status == 400, await r.text()
