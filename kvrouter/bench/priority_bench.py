"""`kvrouter bench priority`: do interactive requests keep their TTFT while batch traffic
saturates the fleet?

Three runs on a fresh simulated fleet each (`kvrouter sim`, `kvrouter serve`, Redis, as real
processes; the simulated engines take at most `--max-batch` sequences each, vLLM's
max_num_seqs, and queue the rest):

  idle        interactive requests alone: the baseline TTFT.
  saturated   the same interactive requests while `--batch-clients` closed-loop batch clients
              keep the engines full, with the router's priority queue off (every request goes
              straight to the engines and waits in their queues).
  priority    the same load with the queue on: `KVR_WORKER_MAX_INFLIGHT` = `--max-batch`, batch
              requests marked `x-kvrouter-priority: batch` fill at most `KVR_BATCH_SHARE` of
              the slots and wait in the router; interactive ones start at once.

Interactive requests stream, and their TTFT is the time to the first streamed byte, in
simulated seconds. The ratio printed is each run's TTFT p99 over the idle run's (target: the
priority run within 2x). Batch requests completed per simulated second say what batch gave
up. The last stdout line is one JSON object. No number here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import aiohttp

from kvrouter.bench.common import emit_json, percentile, print_table
from kvrouter.bench.stack import LocalStack, StackConfig

MODEL = "llama-3-8b"
TARGET_RATIO = 2.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16, help="sequences per engine")
    parser.add_argument("--batch-clients", type=int, default=64)
    parser.add_argument("--batch-share", type=float, default=0.5)
    parser.add_argument("--interactive", type=int, default=40, help="interactive requests")
    parser.add_argument("--interval", type=float, default=0.25, help="s between interactive")
    parser.add_argument("--time-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=11)


async def _ttft(s: aiohttp.ClientSession, url: str, prompt: list[int]) -> float:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": True}
    t0 = time.perf_counter()
    async with s.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        await r.content.readany()
        ttft = time.perf_counter() - t0
        await r.read()
    return ttft


async def _batch_client(
    s: aiohttp.ClientSession, url: str, rng: random.Random, stop: asyncio.Event, done: list[int]
) -> None:
    headers = {"x-kvrouter-priority": "batch"}
    while not stop.is_set():
        prompt = [rng.randrange(1, 30000) for _ in range(512)]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 128}
        try:
            async with s.post(url + "/v1/completions", json=body, headers=headers) as r:
                await r.read()
                if r.status == 200:
                    done.append(1)
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)


async def _one_run(args: argparse.Namespace, name: str) -> dict[str, Any]:
    env: tuple[tuple[str, str], ...] = ()
    if name == "priority":
        env = (
            ("KVR_WORKER_MAX_INFLIGHT", str(args.max_batch)),
            ("KVR_BATCH_SHARE", str(args.batch_share)),
        )
    cfg = StackConfig(
        workers=args.workers,
        kv_events=False,
        time_scale=args.time_scale,
        seed=args.seed,
        model=MODEL,
        extra_router_env=env,
        sim_args=("--max-batch", str(args.max_batch)),
    )
    rng = random.Random(args.seed)
    async with LocalStack(cfg) as stack:
        url = stack.router_urls[0]
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            stop = asyncio.Event()
            done: list[int] = []
            clients = []
            if name != "idle":
                clients = [
                    asyncio.create_task(_batch_client(s, url, random.Random(i), stop, done))
                    for i in range(args.batch_clients)
                ]
                await asyncio.sleep(2.0)  # let the engines fill up
            started = time.perf_counter()
            done.clear()
            ttfts = []
            for _ in range(args.interactive):
                prompt = [rng.randrange(1, 30000) for _ in range(256)]
                ttfts.append(await _ttft(s, url, prompt) * args.time_scale)
                await asyncio.sleep(args.interval)
            elapsed = (time.perf_counter() - started) * args.time_scale
            stop.set()
            for t in clients:
                t.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
    return {
        "run": name,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "batch_per_s": len(done) / elapsed if elapsed else 0.0,
    }


def run(args: argparse.Namespace) -> int:
    results = [asyncio.run(_one_run(args, name)) for name in ("idle", "saturated", "priority")]
    idle = results[0]["ttft_p99_s"]
    rows = []
    for r in results:
        r["p99_vs_idle"] = r["ttft_p99_s"] / idle if idle else float("inf")
        rows.append(
            (
                r["run"],
                f"TTFT p50 {r['ttft_p50_s'] * 1000:.0f} ms, p99 {r['ttft_p99_s'] * 1000:.0f} ms",
                f"{r['p99_vs_idle']:.2f}x idle p99; batch {r['batch_per_s']:.1f} req/s",
            )
        )
    print_table(rows, ("run", "interactive TTFT (simulated)", "ratio"))
    met = results[2]["p99_vs_idle"] <= TARGET_RATIO
    print(f"priority run: interactive TTFT p99 {results[2]['p99_vs_idle']:.2f}x idle "
          f"(target <= {TARGET_RATIO}x): {'met' if met else 'NOT met'}")  # fmt: skip
    emit_json(
        {
            "bench": "priority",
            "runs": results,
            "target_met": met,
            "args": {k: v for k, v in vars(args).items() if not callable(v)},
        }
    )
    return 0
