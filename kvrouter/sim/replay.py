"""`kvrouter replay`: send a Mooncake trace to a router (or a worker) and time every request.

Each trace request becomes `POST <url>/v1/completions` with `prompt: [token ids]` (see
kvrouter.sim.trace for how hash ids become tokens), `max_tokens: output_length` (optionally
capped), `stream: true` and `stream_options: {include_usage: true}`. Arrivals follow the
trace's timestamps divided by the time scale; a concurrency cap delays arrivals (in order)
when too many requests are in flight. Per request it records the worker (the router's
`x-kvrouter-worker` header, else a simulated worker's own `x-sim-worker`), time to first
token (first streamed chunk carrying text), end-to-end time (until `[DONE]`), prompt and
cached tokens from the final usage chunk, HTTP status and error.

`replay_trace()` is the importable core; `summarize()` turns its records into the numbers a
benchmark reports. The command prints one JSON summary line on stdout at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson

from kvrouter.sim.settings import DEFAULT_CAPACITY_TOKENS
from kvrouter.sim.trace import (
    TraceError,
    TraceRequest,
    TraceTokenizer,
    bundled_trace,
    infinite_cache_hit_ratio,
    load_trace,
    lru_cache_hit_ratio,
)

ROUTER_WORKER_HEADER = "x-kvrouter-worker"
ROUTER_MATCHED_HEADER = "x-kvrouter-matched-tokens"
SIM_WORKER_HEADER = "x-sim-worker"
DEFAULT_POOLED_WORKERS = 8
BODY_LOOKAHEAD = 256
"""Request bodies built ahead of their send time, at most."""


@dataclass(slots=True)
class RequestRecord:
    """The outcome of one replayed request (times in real seconds)."""

    index: int
    """Position of the request in the trace file."""
    arrival_s: float
    """Scheduled arrival, from the replay's start (trace time / time scale)."""
    sent_s: float | None = None
    """When it was actually sent (later than arrival when the concurrency cap held it)."""
    worker: str | None = None
    status: int = 0
    """HTTP status; 0 when no response arrived."""
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int = 0
    """Tokens sent in the prompt."""
    cached_tokens: int | None = None
    matched_tokens: int | None = None
    """The router's prediction of ``cached_tokens`` on the worker it chose (its
    ``x-kvrouter-matched-tokens`` header); None without a router."""
    completion_tokens: int | None = None
    max_tokens: int = 0
    error: str | None = None
    tpot_s: float | None = None
    """Time per output token after the first: (last token - first token) / (tokens - 1)."""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def late_s(self) -> float | None:
        """How much later than scheduled it was sent (the client or the concurrency cap
        fell behind); None if never sent."""
        return None if self.sent_s is None else max(0.0, self.sent_s - self.arrival_s)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def completions_url(base: str) -> str:
    """`http://host:port` (or `.../v1`, or the full path) to the completions endpoint."""
    url = base.rstrip("/")
    if url.endswith("/v1/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/completions"
    return url + "/v1/completions"


class ProgressBar:
    """A one-line progress bar on a stream (stderr), redrawn at most 10 times a second."""

    def __init__(self, total: int, stream: IO[str] | None = None, width: int = 30) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done = 0
        self.failed = 0
        self.in_flight = 0
        self._t0 = time.monotonic()
        self._last = 0.0

    def update(self, *, finished: RequestRecord | None = None, in_flight: int = 0) -> None:
        if finished is not None:
            self.done += 1
            self.failed += 0 if finished.ok else 1
        self.in_flight = in_flight
        now = time.monotonic()
        if now - self._last >= 0.1 or self.done == self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(
            f"\rreplay [{bar}] {self.done}/{self.total} {frac:4.0%} "
            f"failed {self.failed} in flight {self.in_flight} {now - self._t0:6.1f}s"
        )
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    rec: RequestRecord,
    client_timeout: aiohttp.ClientTimeout,
) -> None:
    loop = asyncio.get_running_loop()
    t_send = loop.time()
    t_last = 0.0
    try:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}, timeout=client_timeout
        ) as resp:
            rec.status = resp.status
            rec.worker = resp.headers.get(ROUTER_WORKER_HEADER) or resp.headers.get(
                SIM_WORKER_HEADER
            )
            matched = resp.headers.get(ROUTER_MATCHED_HEADER)
            if matched is not None and matched.isdigit():
                rec.matched_tokens = int(matched)
            if resp.status != 200:
                rec.error = (await resp.text())[:300]
                return
            done = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = orjson.loads(data)
                if "error" in chunk:
                    rec.error = json.dumps(chunk["error"])[:300]
                    continue
                if any(
                    c.get("text") or (c.get("delta") or {}).get("content")
                    for c in chunk.get("choices") or ()
                ):
                    t_last = loop.time() - t_send
                    if rec.ttft_s is None:
                        rec.ttft_s = t_last
                usage = chunk.get("usage")
                if usage:
                    rec.completion_tokens = usage.get("completion_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    rec.cached_tokens = details.get("cached_tokens")
            rec.e2e_s = loop.time() - t_send
            n = rec.completion_tokens
            if rec.ttft_s is not None and n is not None and n > 1:
                rec.tpot_s = (t_last - rec.ttft_s) / (n - 1)
            if not done and rec.error is None:
                rec.error = "stream ended without [DONE]"
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:300]


def request_body(prompt: list[int], max_tokens: int, user: str, model: str | None) -> bytes:
    """The JSON body of one replayed completions request (streamed, with usage)."""
    payload: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": max(1, max_tokens),
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": user,
    }
    if model:
        payload["model"] = model
    return orjson.dumps(payload)


def session_id(req: TraceRequest) -> str:
    """A conversation id for the `user` field: the trace's conversations all open with the
    shared system-prompt block, and the block after it is unique to one conversation (every
    later turn repeats the whole history), so it names the conversation. Applications send
    such an id themselves; the `session` policy routes on it."""
    return f"conv-{req.hash_ids[1] if len(req.hash_ids) > 1 else req.hash_ids[0]}"


async def replay_trace(
    requests: Sequence[TraceRequest],
    url: str | Sequence[str],
    *,
    time_scale: float = 1.0,
    concurrency: int = 256,
    max_tokens_cap: int | None = None,
    model: str | None = None,
    seed: int = 0,
    first_index: int = 0,
    start_ms: float | None = None,
    timeout_s: float = 600.0,
    session: aiohttp.ClientSession | None = None,
    on_record: Callable[[RequestRecord], None] | None = None,
    progress: bool | ProgressBar = False,
) -> list[RequestRecord]:
    """Replay `requests` against `url` (router or worker base URL); records in trace order.

    Several URLs (router replicas) are used round-robin, request by request: the simplest
    load-balancer front.
    `first_index` is the trace position of `requests[0]` (for the records' `index`).
    `start_ms`: the trace time replay starts at (default: the first request's); several
    replays given the same one keep their relative timing (one trace split by model).
    `on_record` is called as each request completes (e.g. to stream records to a file).
    Pass a `session` to reuse a connection pool; otherwise one is made with a connection
    limit equal to `concurrency`.
    """
    if time_scale <= 0:
        raise ValueError("time_scale must be > 0")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    targets = [completions_url(u) for u in ([url] if isinstance(url, str) else url)]
    if not targets:
        raise ValueError("at least one URL is needed")
    tokenizer = TraceTokenizer(seed=seed)
    records = [
        RequestRecord(
            index=first_index + i,
            arrival_s=0.0,
            max_tokens=min(r.output_length, max_tokens_cap) if max_tokens_cap else r.output_length,
        )
        for i, r in enumerate(requests)
    ]
    if not requests:
        return records
    t_first = requests[0].timestamp_ms if start_ms is None else start_ms
    for rec, req in zip(records, requests, strict=True):
        rec.arrival_s = max(0.0, (req.timestamp_ms - t_first) / 1000.0 / time_scale)
    bar = progress if isinstance(progress, ProgressBar) else None
    if progress is True:
        bar = ProgressBar(len(requests))
    own_session = session is None
    if session is None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency, force_close=False)
        )
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    slots = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    in_flight = 0

    # Request bodies are built ahead of their send time by a task of their own, one body per
    # turn of the event loop, so sends and streamed responses wait for at most one body's
    # encoding (about 1 ms for 14k tokens). Built at send time instead, a burst of long prompts
    # (several requests in one millisecond, as the Mooncake traces have) would wait for each
    # other's encoding, and that wait would count as the client sending late. At most
    # `BODY_LOOKAHEAD` bodies are held at once.
    bodies: dict[int, bytes] = {}
    dispatched = 0
    advanced = asyncio.Event()

    def build(i: int) -> bytes:
        req, rec = requests[i], records[i]
        prompt = tokenizer.prompt(req)
        rec.prompt_tokens = len(prompt)
        return request_body(prompt, rec.max_tokens, session_id(req), model)

    async def build_ahead(first: int) -> None:
        nxt = first
        while True:
            nxt = max(nxt, dispatched)  # sent already (built at send time): skip
            if nxt >= len(requests):
                return
            if nxt >= dispatched + BODY_LOOKAHEAD:
                advanced.clear()
                await advanced.wait()
                continue
            bodies[nxt] = build(nxt)
            nxt += 1
            await asyncio.sleep(0)

    async def run_one(rec: RequestRecord, body: bytes) -> None:
        nonlocal in_flight
        try:
            rec.sent_s = loop.time() - t0
            assert session is not None
            target = targets[(rec.index - first_index) % len(targets)]
            await _one(session, target, body, rec, timeout)
        finally:
            in_flight -= 1
            slots.release()
            if on_record is not None:
                on_record(rec)
            if bar is not None:
                bar.update(finished=rec, in_flight=in_flight)

    for i in range(min(len(requests), BODY_LOOKAHEAD)):
        bodies[i] = build(i)
    builder = asyncio.create_task(build_ahead(BODY_LOOKAHEAD))
    t0 = loop.time()
    try:
        for i, rec in enumerate(records):
            delay = t0 + rec.arrival_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            in_flight += 1
            body = bodies.pop(i, None)
            if body is None:  # the builder fell behind
                body = build(i)
            dispatched = i + 1
            advanced.set()
            task = asyncio.create_task(run_one(rec, body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*tasks)
    finally:
        builder.cancel()
        # A body that cannot be built fails the dispatch too (it builds any body the builder
        # did not): the builder's own copy of that error is retrieved here, not logged.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await builder
        for task in tasks:
            task.cancel()
        if own_session:
            await session.close()
        if bar is not None:
            bar.close()
    return records


# -- summary -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None if empty."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def prediction(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """How well the router predicted the engine's cache hits, over successful requests that
    report both (the router's matched tokens and the engine's cached tokens): the share
    predicted exactly, and the tokens over-predicted (matched but not cached: a prefill the
    router did not expect) and under-predicted (cached but not matched), each also as a
    share of those requests' prompt tokens."""
    both = [
        (r.matched_tokens, r.cached_tokens, r.prompt_tokens)
        for r in records
        if r.ok and r.matched_tokens is not None and r.cached_tokens is not None
    ]
    prompt = sum(p for _, _, p in both)
    over = sum(max(0, m - c) for m, c, _ in both)
    under = sum(max(0, c - m) for m, c, _ in both)
    return {
        "predicted": len(both),
        "exact_share": sum(1 for m, c, _ in both if m == c) / len(both) if both else None,
        "over_tokens": over,
        "under_tokens": under,
        "over_share": over / prompt if prompt else None,
        "under_share": under / prompt if prompt else None,
    }


def summarize(records: Sequence[RequestRecord], duration_s: float | None = None) -> dict[str, Any]:
    """Counts, hit ratio (cached over prompt tokens of successful requests), the router's
    prediction accuracy (``prediction``), latency percentiles in real seconds, throughput and
    requests per worker."""
    ok = [r for r in records if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    late = [t for t in (r.late_s for r in records) if t is not None]
    if duration_s is None:
        ends = [(r.sent_s or 0.0) + (r.e2e_s or 0.0) for r in records]
        duration_s = max(ends, default=0.0)
    return {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "hit_ratio": cached / prompt if prompt else 0.0,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p99_s": percentile(e2e, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
        "late_p99_s": percentile(late, 99),
        "late_max_s": max(late, default=None),
        "duration_s": duration_s,
        "throughput_rps": len(ok) / duration_s if duration_s else 0.0,
        "per_worker": dict(sorted(Counter(r.worker or "?" for r in ok).items())),
        **prediction(records),
    }


# -- command -------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Flags of `kvrouter replay`."""
    parser.add_argument(
        "trace", nargs="?", default="bundled",
        help="Mooncake JSONL trace (default: the bundled conversation trace)",
    )  # fmt: skip
    parser.add_argument("--router", help="base URL of the router (or one worker)")
    parser.add_argument("--model", help="model name to send (default: none, the server's)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="trace seconds per real second (default 1)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=256,
                        help="most requests in flight (default 256)")  # fmt: skip
    parser.add_argument("--start", type=int, default=0, help="skip this many trace lines")
    parser.add_argument("--limit", type=int, help="replay at most this many requests")
    parser.add_argument("--max-tokens-cap", type=int,
                        help="cap every request's max_tokens (output_length)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="token synthesis seed (default 0)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="per-request timeout in seconds (default 600)")  # fmt: skip
    parser.add_argument("--out", help="write one JSON record per request to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--block-size", type=int, default=16,
                        help="block size for the ideal hit ratios (default 16)")  # fmt: skip
    parser.add_argument(
        "--pooled-capacity-tokens", type=int,
        default=DEFAULT_POOLED_WORKERS * DEFAULT_CAPACITY_TOKENS,
        help="capacity of the pooled-ideal LRU cache (default: 8 workers x "
        f"{DEFAULT_CAPACITY_TOKENS:,} tokens)",
    )  # fmt: skip
    parser.add_argument("--ideal-only", action="store_true",
                        help="only print the slice's ideal hit ratios; send nothing")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run `kvrouter replay`; prints one JSON summary line on stdout."""
    source = bundled_trace() if args.trace == "bundled" else Path(args.trace)
    try:
        requests = load_trace(source, start=args.start, limit=args.limit)
    except (OSError, TraceError) as exc:
        print(f"kvrouter replay: {exc}", file=sys.stderr)
        return 2
    ideal = infinite_cache_hit_ratio(requests, block_size=args.block_size)
    pooled = lru_cache_hit_ratio(
        requests, args.pooled_capacity_tokens // args.block_size, block_size=args.block_size
    )
    ideals = {"ideal_hit_ratio": ideal.ratio, "pooled_hit_ratio": pooled.ratio,
              "pooled_capacity_tokens": args.pooled_capacity_tokens}  # fmt: skip
    if args.ideal_only:
        print(json.dumps({"requests": len(requests), **ideals}))
        return 0
    if not args.router:
        print("kvrouter replay: --router URL is required (or --ideal-only)", file=sys.stderr)
        return 2
    out: IO[str] | None = open(args.out, "w", encoding="utf-8") if args.out else None  # noqa: SIM115

    def write(rec: RequestRecord) -> None:
        if out is not None:
            out.write(json.dumps(rec.to_json()) + "\n")
            out.flush()

    started = time.monotonic()
    try:
        records = asyncio.run(
            replay_trace(
                requests, args.router, time_scale=args.time_scale,
                concurrency=args.concurrency, max_tokens_cap=args.max_tokens_cap,
                model=args.model, seed=args.seed, first_index=args.start,
                timeout_s=args.timeout, on_record=write, progress=not args.no_progress,
            )
        )  # fmt: skip
    except KeyboardInterrupt:
        return 130
    finally:
        if out is not None:
            out.close()
    summary = summarize(records, time.monotonic() - started)
    print(json.dumps({**summary, **ideals}))
    return 0 if summary["failed"] == 0 else 1
