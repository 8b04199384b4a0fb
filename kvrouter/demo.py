"""`kvrouter demo`: the whole system on an embedded default, in under two minutes.

With nothing configured it starts Redis itself (a `redis-server` from PATH on a free port,
else an in-process fakeredis speaking the Redis protocol with Lua), 8 simulated vLLM workers,
the eviction listener and the router, replays one workload once per policy, and says how
`kv` compares with `round_robin` and `least_load`: hit ratio and TTFT p50/p90, and where the
plots are.

The default workload is the one cache-aware routing exists for: many groups of requests, each
sharing a long system prompt, whose prefixes together are three times one worker's KV cache
but fit in the fleet's (kvrouter.sim.workload), offered at a load where round-robin queues.
``--workload bundled`` replays a slice of the bundled Mooncake conversation trace (Apache-2.0,
see kvrouter/sim/data/NOTICE) at its recorded, light load instead.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from kvrouter.bench.routing_bench import (
    DEFAULT_MAX_LAG_S,
    VARIANTS,
    plot_results,
    results_table,
    run_variant,
    validity,
    validity_lines,
)
from kvrouter.redisproc import RedisServer, free_port
from kvrouter.sim.replay import RequestRecord
from kvrouter.sim.settings import DEFAULT_CAPACITY_TOKENS, SimSettings
from kvrouter.sim.trace import (
    TraceRequest,
    bundled_trace,
    infinite_cache_hit_ratio,
    load_trace,
    lru_cache_hit_ratio,
)
from kvrouter.sim.workload import SharedPrefixSpec, at_load, shared_prefix_trace, span_s

DEMO_VARIANTS = ("kv", "round_robin", "least_load")
# The shared-prefix demo: 48 groups x 2,048 tokens = 3x one worker's 32,768-token cache, 1,000
# requests (4.8% first sightings), at 1.5x the fleet's prefill capacity in offered prompt
# tokens: round-robin, whose caches thrash, must prefill most of every prompt and queues; kv
# prefills little more than the questions.
DEMO_SPEC = SharedPrefixSpec(groups=48, requests=1000)
DEMO_CAPACITY_TOKENS = 32_768
DEMO_LOAD = 1.5
# At most this many requests per real second, so the demo measures the router on a laptop
# (or a shared CI runner) rather than the machine: the time scale is lowered to fit.
DEMO_MAX_REAL_RPS = 60.0


def configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument(
        "--workload",
        choices=("shared-prefix", "bundled"),
        default="shared-prefix",
        help="shared-prefix (default: where routing decides the outcome) or a slice of the "
        "bundled conversation trace at its recorded load",
    )
    parser.add_argument(
        "--requests",
        type=int,
        help=f"requests to replay (default {DEMO_SPEC.requests} shared-prefix, 300 bundled)",
    )
    parser.add_argument(
        "--load",
        type=float,
        default=DEMO_LOAD,
        help="shared-prefix: offered prompt tokens/s over the fleet's prefill capacity "
        f"(default {DEMO_LOAD:g})",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        help="trace seconds per real second (default: 5 bundled; shared-prefix as fast as "
        f"{DEMO_MAX_REAL_RPS:g} requests per real second allow)",
    )
    parser.add_argument("--out", default="out/demo", help="where the plots go")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--redis-url", help="use this Redis instead of starting one (data is flushed)"
    )


@contextmanager
def embedded_redis() -> Iterator[str]:
    """redis-server from PATH when installed, else fakeredis over TCP in this process."""
    if shutil.which("redis-server"):
        with RedisServer() as server:
            yield server.url
        return
    try:
        from fakeredis import TcpFakeServer
    except ImportError:
        raise SystemExit(
            "kvrouter demo needs Redis: install redis-server (apt-get install redis-server) "
            "or fakeredis with Lua (pip install 'kvrouter[demo]')"
        ) from None
    port = free_port()
    fake = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    thread = threading.Thread(target=fake.serve_forever, name="fakeredis", daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        fake.shutdown()
        fake.server_close()


def _workload(args: argparse.Namespace) -> tuple[list[TraceRequest], int, float, str]:
    """(requests, capacity tokens per worker, time scale, a description) from the flags."""
    if args.workload == "bundled":
        requests = load_trace(bundled_trace(), limit=args.requests or 300)
        scale = args.time_scale or 5.0
        return (
            requests,
            DEFAULT_CAPACITY_TOKENS,
            scale,
            f"{len(requests)} requests of the bundled Mooncake trace",
        )
    spec = SharedPrefixSpec(groups=DEMO_SPEC.groups, requests=args.requests or DEMO_SPEC.requests)
    fleet = SimSettings().prefill_tokens_per_s * args.workers
    requests = at_load(shared_prefix_trace(spec), args.load, fleet)
    rps = (len(requests) - 1) / span_s(requests)
    scale = args.time_scale or DEMO_MAX_REAL_RPS / rps
    return (
        requests,
        DEMO_CAPACITY_TOKENS,
        scale,
        f"{len(requests)} requests in {spec.groups} groups sharing {spec.prefix_tokens:,}-token "
        f"system prompts (+{spec.question_tokens}-token questions), offered at load "
        f"{args.load:g} (prompt tokens/s over the fleet's prefill capacity)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit status 1 when any request failed."""
    requests, capacity, scale, what = _workload(args)
    bs = 16
    ideal = infinite_cache_hit_ratio(requests, block_size=bs).ratio
    pooled = lru_cache_hit_ratio(requests, args.workers * capacity // bs, block_size=bs).ratio
    print(
        f"kvrouter demo: {what}; {args.workers} simulated workers x {capacity:,} tokens of KV "
        f"cache, time scale {scale:.3g}",
        flush=True,
    )
    bench_args = argparse.Namespace(workers=args.workers, capacity_tokens=capacity, concurrency=512)
    variants = [v for v in VARIANTS if v.name in DEMO_VARIANTS]
    results: dict[str, dict[str, Any]] = {}
    ttfts: dict[str, list[float]] = {}
    t0 = time.monotonic()
    # A given --redis-url is used as it is: no embedded server is started beside it.
    redis: AbstractContextManager[str] = (
        nullcontext(args.redis_url) if args.redis_url else embedded_redis()
    )
    with redis as url:
        for v in variants:
            print(f"  {v.name:<12} ", end="", flush=True)
            summary, records = asyncio.run(
                run_variant(v, bench_args, requests, scale, redis_url=url)
            )
            results[v.name] = summary
            ttfts[v.name] = _ttfts(records, scale)
            print(
                f"hit ratio {summary['hit_ratio']:.3f}, "
                f"TTFT p50 {summary['ttft_p50_s'] or 0:.2f} s",
                flush=True,
            )
    for summary in results.values():
        summary["invalid"] = validity(summary, DEFAULT_MAX_LAG_S)
    print()
    print(results_table(results, ideal, pooled))
    # A busy laptop delays the client or the router: say so rather than show its numbers as
    # the router's.
    print(validity_lines(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_results(out, results, ttfts, ideal, pooled)
    print()
    print(verdict(results, time.monotonic() - t0, out))
    failed = sum(r["failed"] for r in results.values())
    return 0 if failed == 0 else 1


def _ttfts(records: list[RequestRecord], scale: float) -> list[float]:
    return sorted(r.ttft_s * scale for r in records if r.ok and r.ttft_s is not None)


def verdict(results: dict[str, dict[str, Any]], elapsed_s: float, out: Path) -> str:
    """The result in words: kv against round_robin and least_load, and where the plots are."""
    kv, rr = results["kv"], results["round_robin"]
    lines = []
    if rr["hit_ratio"] > 0 and kv["ttft_p50_s"] and rr["ttft_p50_s"]:
        lines.append(
            f"kv: {kv['hit_ratio'] / rr['hit_ratio']:.1f}x round_robin's hit ratio, "
            f"TTFT p50 {rr['ttft_p50_s'] / kv['ttft_p50_s']:.1f}x lower"
        )
    for other in ("round_robin", "least_load"):
        o = results.get(other)
        if o is None:
            continue
        parts = [f"hit ratio {kv['hit_ratio']:.2f} vs {o['hit_ratio']:.2f}"]
        if o["hit_ratio"] > 0:
            parts[0] += f" ({kv['hit_ratio'] / o['hit_ratio']:.1f}x)"
        for q in ("p50", "p90"):
            a, b = kv[f"ttft_{q}_s"], o[f"ttft_{q}_s"]
            if a and b:
                rel = f"{b / a:.1f}x lower" if b >= a else f"{a / b:.1f}x higher"
                parts.append(f"TTFT {q} {a:.2f} s vs {b:.2f} s ({rel})")
        lines.append(f"kv against {other}: " + ", ".join(parts))
    failed = sum(r["failed"] for r in results.values())
    lines.append(
        f"{failed} failed requests; latencies in simulated seconds; {elapsed_s:.0f} s. "
        f"Plots: {out / 'ttft_cdf.png'}, {out / 'hit_ratio.png'}, {out / 'load.png'}"
    )
    if failed:
        print(f"kvrouter demo: {failed} requests failed", file=sys.stderr)
    return "\n".join(lines)
