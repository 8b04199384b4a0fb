"""Mooncake trace handling, ideal hit ratios on hand-computed traces, and the replay client."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvrouter.cli import main as kvrouter_main
from kvrouter.sim.fleet import SimFleet, read_ready_file
from kvrouter.sim.replay import (
    RequestRecord,
    completions_url,
    percentile,
    replay_trace,
    summarize,
)
from kvrouter.sim.settings import SimSettings
from kvrouter.sim.trace import (
    TraceError,
    TraceRequest,
    TraceTokenizer,
    bundled_trace,
    infinite_cache_hit_ratio,
    load_trace,
    lru_cache_hit_ratio,
    parse_line,
)

REPO = Path(__file__).resolve().parents[2]


def tr(input_length: int, ids: list[int], output_length: int = 2, ts: float = 0) -> TraceRequest:
    return TraceRequest(ts, input_length, output_length, tuple(ids))


# With 4-token trace blocks and 2-token cache blocks, hash id h covers cache blocks
# keyed 2h and 2h+1.
TINY = [
    tr(8, [1, 2]),  # keys 2 3 4 5; nothing cached yet
    tr(7, [1, 3]),  # keys 2 3 6; cap (7-1)//2 = 3; hits 2 3 -> 4 tokens
    tr(8, [1, 2]),  # keys 2 3 4 5; cap 3 blocks -> 6 tokens with an infinite cache
    tr(5, [1, 2]),  # keys 2 3 (1 token of block 2 is partial); cap 2 -> 4 tokens
]


def test_infinite_cache_hand_computed() -> None:
    r = infinite_cache_hit_ratio(TINY, block_size=2, trace_block_tokens=4)
    assert (r.hit_tokens, r.prompt_tokens) == (14, 28)
    assert r.ratio == 0.5


def test_lru_cache_hand_computed() -> None:
    kw = {"block_size": 2, "trace_block_tokens": 4, "include_output": False}
    # Capacity 4 holds everything that is ever reused: same as infinite.
    assert lru_cache_hit_ratio(TINY, 4, **kw).hit_tokens == 14  # type: ignore[arg-type]
    # Capacity 3: after r1 [4 3 2] (5 evicted, tail first); r2 hits 2 3, then [6 3 2];
    # r3 hits 2 3 but not 4 -> 4 tokens, then [4 3 2]; r4 hits 2 3 -> 4 tokens.
    assert lru_cache_hit_ratio(TINY, 3, **kw).hit_tokens == 12  # type: ignore[arg-type]
    assert lru_cache_hit_ratio(TINY, 0, **kw).hit_tokens == 0  # type: ignore[arg-type]


def test_lru_output_blocks_take_room() -> None:
    # Capacity 4 with 2 output tokens each: r1 stores 2 3 4 5 + one output block; after r2
    # (keys 2 3 6 + output) the LRU holds [out2 6 3 2], so r3 misses key 4 -> 4 tokens.
    r = lru_cache_hit_ratio(TINY, 4, block_size=2, trace_block_tokens=4)
    assert (r.hit_tokens, r.prompt_tokens) == (12, 28)


def test_trace_tokens_deterministic_per_hash_id() -> None:
    tok = TraceTokenizer(seed=7)
    a = tok.prompt(tr(1000, [0, 1]))
    b = TraceTokenizer(seed=7).prompt(tr(1500, [0, 2, 3]))
    assert len(a) == 1000 and len(b) == 1500
    assert a[:512] == b[:512]  # equal ids, equal tokens
    assert a[512:1000] != b[512:1000]
    full = tok.prompt(tr(1024, [0, 1]))
    assert a == full[:1000]  # the last block is a prefix of the id's full run
    assert all(0 <= t < 128_000 for t in full)
    assert TraceTokenizer(seed=8).prompt(tr(512, [0])) != a[:512]


def test_parse_rejects_bad_lines() -> None:
    assert parse_line('{"timestamp": 5, "input_length": 513, "output_length": 1, '
                      '"hash_ids": [1, 2]}') == tr(513, [1, 2], 1, 5)  # fmt: skip
    with pytest.raises(TraceError, match="needs 2 hash_ids"):
        parse_line('{"timestamp": 0, "input_length": 513, "output_length": 1, "hash_ids": [1]}')
    with pytest.raises(TraceError):
        parse_line('{"timestamp": 0}')
    with pytest.raises(TraceError):
        parse_line("not json")


def test_bundled_trace_is_shipped() -> None:
    head = load_trace(bundled_trace(), limit=3)
    assert len(head) == 3 and all(r.hash_ids[0] == 0 for r in head)
    data = resources.files("kvrouter.sim").joinpath("data")
    assert "Apache License" in data.joinpath("LICENSE").read_text(encoding="utf-8")
    assert "Mooncake" in data.joinpath("NOTICE").read_text(encoding="utf-8")
    assert load_trace(bundled_trace(), start=12_030)[0].input_length > 0


def test_percentile_and_summary() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert percentile([], 50) is None
    recs = [
        RequestRecord(0, 0.0, 0.0, "w0", 200, 0.1, 1.0, 100, 50, 5),
        RequestRecord(1, 0.0, 0.5, "w1", 200, 0.3, 2.0, 300, 0, 5),
        RequestRecord(2, 0.0, 0.6, None, 0, error="refused"),
    ]
    s = summarize(recs, duration_s=4.0)
    assert (s["requests"], s["ok"], s["failed"]) == (3, 2, 1)
    assert s["hit_ratio"] == 50 / 400
    assert s["ttft_p50_s"] == pytest.approx(0.2)
    assert s["throughput_rps"] == 0.5
    assert s["per_worker"] == {"w0": 1, "w1": 1}


def test_completions_url() -> None:
    assert completions_url("http://h:1") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/completions") == "http://h:1/v1/completions"


async def test_replay_against_a_worker() -> None:
    trace = [
        tr(1000, [0, 1], 20, ts=0),
        tr(1000, [0, 2], 30, ts=1000),  # shares hash id 0: 512 cached tokens
        tr(600, [3, 4], 5, ts=2000),
    ]
    settings = SimSettings(workers=1, base_port=0, time_scale=200.0)
    async with SimFleet(settings) as fleet:
        assert fleet.info is not None
        seen: list[int] = []
        recs = await replay_trace(
            trace, fleet.info.workers[0].url, time_scale=10.0, max_tokens_cap=25,
            first_index=40, on_record=lambda r: seen.append(r.index),
        )  # fmt: skip
    assert sorted(seen) == [40, 41, 42]
    assert [r.index for r in recs] == [40, 41, 42]
    assert all(r.ok and r.worker == "sim-0" for r in recs), recs
    assert [r.prompt_tokens for r in recs] == [1000, 1000, 600]
    assert [r.completion_tokens for r in recs] == [20, 25, 5]
    assert [r.cached_tokens for r in recs] == [0, 512, 0]
    assert [r.arrival_s for r in recs] == [0.0, 0.1, 0.2]
    for r in recs:
        assert r.ttft_s is not None and r.e2e_s is not None and r.sent_s is not None
        assert 0 < r.ttft_s <= r.e2e_s
        assert r.sent_s >= r.arrival_s


async def test_replay_concurrency_cap_serializes() -> None:
    trace = [tr(100, [i], 10) for i in range(4)]  # all arrive at once
    async with SimFleet(SimSettings(workers=1, base_port=0, time_scale=50.0)) as fleet:
        assert fleet.info is not None
        recs = await replay_trace(trace, fleet.info.workers[0].url, concurrency=1)
    for prev, nxt in itertools.pairwise(recs):
        assert prev.sent_s is not None and prev.e2e_s is not None and nxt.sent_s is not None
        assert nxt.sent_s >= prev.sent_s + prev.e2e_s


async def _recording_worker(
    received: dict[str, float], bodies: list[dict[str, object]]
) -> tuple[aiohttp.web.AppRunner, str]:
    """A minimal streamed-completions endpoint noting when each conversation's request came."""
    from aiohttp import web

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        received[body["user"]] = time.monotonic()
        bodies.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"choices": [{"text": "x"}], "usage": {"completion_tokens": 1}}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def test_replay_builds_bodies_before_they_are_due(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst's prompts are encoded before the burst is due, so encoding one request never
    makes the next one late; bodies further out are built while the client waits, at most
    BODY_LOOKAHEAD at a time."""
    import kvrouter.sim.replay as replay

    built: dict[str, float] = {}
    real_prompt = TraceTokenizer.prompt

    def prompt(self: TraceTokenizer, req: TraceRequest) -> list[int]:
        built[f"conv-{req.hash_ids[1]}"] = time.monotonic()
        return real_prompt(self, req)

    monkeypatch.setattr(TraceTokenizer, "prompt", prompt)
    monkeypatch.setattr(replay, "BODY_LOOKAHEAD", 3)
    sent: dict[str, float] = {}
    real_one = replay._one

    async def one(session: aiohttp.ClientSession, url: str, body: bytes, *rest: Any) -> None:
        sent[json.loads(body)["user"]] = time.monotonic()
        await real_one(session, url, body, *rest)

    monkeypatch.setattr(replay, "_one", one)
    # A burst of three requests, then five spaced 50 ms apart (time scale 10).
    trace = [tr(64, [10 * i, 10 * i + 1], 1, ts=0) for i in range(3)]
    trace += [tr(64, [10 * i, 10 * i + 1], 1, ts=500 * (i - 2)) for i in range(3, 8)]
    received: dict[str, float] = {}
    bodies: list[dict[str, object]] = []
    runner, url = await _recording_worker(received, bodies)
    try:
        recs = await replay_trace(trace, url, time_scale=10.0)
    finally:
        await runner.cleanup()
    assert all(r.ok for r in recs), recs
    names = [f"conv-{10 * i + 1}" for i in range(8)]
    assert set(received) == set(sent) == set(names)
    # The burst was encoded before any of it was sent ...
    first_sent = min(sent.values())
    assert all(built[n] < first_sent for n in names[:3])
    # ... the next ones while the client waited for request 3 (due at +50 ms) ...
    assert built[names[5]] < sent[names[4]]
    # ... and never more than three ahead: 6 and 7 only once 3 and 4 were due.
    assert built[names[6]] > first_sent + 0.04
    assert built[names[7]] > first_sent + 0.09
    body = next(b for b in bodies if b["user"] == names[0])
    assert body["prompt"] == TraceTokenizer().prompt(trace[0])
    assert body["max_tokens"] == 1 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_replay_raises_when_a_body_cannot_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt the builder cannot encode fails the replay with that error (it is not
    swallowed by the builder task), after the requests before it were sent."""
    import kvrouter.sim.replay as replay

    real_prompt = TraceTokenizer.prompt

    def prompt(self: TraceTokenizer, req: TraceRequest) -> list[int]:
        if req.hash_ids[0] == 999:
            raise ValueError("cannot build this one")
        return real_prompt(self, req)

    monkeypatch.setattr(TraceTokenizer, "prompt", prompt)
    monkeypatch.setattr(replay, "BODY_LOOKAHEAD", 2)
    trace = [tr(64, [10 * i, 10 * i + 1], 1, ts=100 * i) for i in range(4)]
    trace.append(tr(64, [999, 1000], 1, ts=2000))  # 200 ms after the others
    received: dict[str, float] = {}
    runner, url = await _recording_worker(received, [])
    try:
        with pytest.raises(ValueError, match="cannot build this one"):
            await replay_trace(trace, url, time_scale=10.0)
    finally:
        await runner.cleanup()
    assert set(received) == {f"conv-{10 * i + 1}" for i in range(4)}


async def test_replay_records_connection_errors() -> None:
    async with aiohttp.ClientSession() as session:
        recs = await replay_trace([tr(10, [1])], "http://127.0.0.1:9", session=session)
    (rec,) = recs
    assert rec.status == 0 and rec.error and not rec.ok


def test_replay_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace_file = tmp_path / "t.jsonl"
    lines = [
        {"timestamp": 0, "input_length": 700, "output_length": 4, "hash_ids": [0, 1]},
        {"timestamp": 100, "input_length": 900, "output_length": 4, "hash_ids": [0, 1]},
        {"timestamp": 200, "input_length": 300, "output_length": 4, "hash_ids": [9]},
    ]
    trace_file.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ready = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvrouter", "sim", "--workers", "1", "--base-port", "0",
         "--time-scale", "100", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        worker_url = read_ready_file(ready).workers[0].url
        out = tmp_path / "records.jsonl"
        code = kvrouter_main(
            ["replay", str(trace_file), "--router", worker_url, "--out", str(out),
             "--limit", "2", "--start", "1", "--no-progress"]
        )  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["requests"], summary["ok"], summary["failed"]) == (2, 2, 0)
    assert summary["ideal_hit_ratio"] == 0.0  # the slice shares nothing
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [1, 2]
    assert all(r["status"] == 200 and r["cached_tokens"] == 0 for r in records)


def test_replay_cli_ideal_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert kvrouter_main(["replay", "--ideal-only", "--limit", "50"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    expected = infinite_cache_hit_ratio(load_trace(bundled_trace(), limit=50)).ratio
    assert out["requests"] == 50 and out["ideal_hit_ratio"] == pytest.approx(expected)
    assert 0 < out["pooled_hit_ratio"] <= out["ideal_hit_ratio"]
