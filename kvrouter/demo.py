"""`kvrouter demo`: the whole system on an embedded default, in about two minutes.

With nothing configured it starts Redis itself (a `redis-server` from PATH on a free port,
else an in-process fakeredis speaking the Redis protocol with Lua), 8 simulated vLLM workers
with realistic KV capacity, the eviction listener and the router, replays a slice of the
bundled Mooncake trace (Apache-2.0, see kvrouter/sim/data/NOTICE) once per policy, and prints
how `kv` compares with `round_robin` and `least_load`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

from kvrouter.bench.routing_bench import VARIANTS, results_table, run_variant
from kvrouter.redisproc import RedisServer, free_port
from kvrouter.sim.settings import DEFAULT_CAPACITY_TOKENS
from kvrouter.sim.trace import (
    bundled_trace,
    infinite_cache_hit_ratio,
    load_trace,
    lru_cache_hit_ratio,
)

DEMO_VARIANTS = ("kv", "round_robin", "least_load")


def configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument(
        "--requests", type=int, default=300, help="trace requests to replay (default 300)"
    )
    parser.add_argument("--time-scale", type=float, default=5.0,
                        help="trace seconds per real second (default 5)")  # fmt: skip
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


def run(args: argparse.Namespace) -> int:
    requests = load_trace(bundled_trace(), limit=args.requests)
    bs = 16
    ideal = infinite_cache_hit_ratio(requests, block_size=bs).ratio
    pooled = lru_cache_hit_ratio(
        requests, args.workers * DEFAULT_CAPACITY_TOKENS // bs, block_size=bs
    ).ratio
    print(
        f"kvrouter demo: {len(requests)} requests of the bundled Mooncake trace, "
        f"{args.workers} simulated workers x {DEFAULT_CAPACITY_TOKENS:,} tokens of KV cache, "
        f"time scale {args.time_scale:g}",
        flush=True,
    )
    bench_args = argparse.Namespace(
        workers=args.workers, capacity_tokens=DEFAULT_CAPACITY_TOKENS, concurrency=512
    )
    variants = [v for v in VARIANTS if v.name in DEMO_VARIANTS]
    results = {}
    t0 = time.monotonic()
    # A given --redis-url is used as it is: no embedded server is started beside it.
    redis: AbstractContextManager[str] = (
        nullcontext(args.redis_url) if args.redis_url else embedded_redis()
    )
    with redis as url:
        for v in variants:
            print(f"  {v.name:<12} ", end="", flush=True)
            summary, _ = asyncio.run(
                run_variant(v, bench_args, requests, args.time_scale, redis_url=url)
            )
            results[v.name] = summary
            print(
                f"hit ratio {summary['hit_ratio']:.3f}, "
                f"TTFT p50 {summary['ttft_p50_s'] or 0:.2f} s",
                flush=True,
            )
    print()
    print(results_table(results, ideal, pooled))
    kv, rr = results["kv"], results["round_robin"]
    if rr["hit_ratio"] > 0 and kv["ttft_p50_s"] and rr["ttft_p50_s"]:
        print(
            f"\nkv: {kv['hit_ratio'] / rr['hit_ratio']:.1f}x round_robin's hit ratio, "
            f"TTFT p50 {rr['ttft_p50_s'] / kv['ttft_p50_s']:.1f}x lower "
            f"({time.monotonic() - t0:.0f} s). Latencies are simulated seconds."
        )
    failed = sum(r["failed"] for r in results.values())
    return 0 if failed == 0 else 1
