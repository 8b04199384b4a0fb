"""`kvrouter bench index`: the Lua lookup and record on a 1M-record index, against a naive walk.

Builds an index of at least 1,000,000 residency records over 64 workers (chains of 64-1,024
blocks; half of them start with one of 32 shared "system prompt" prefixes, so blocks are held
by one to many workers as in a real fleet), then measures, on one private redis-server:

  lookup   a 2,048-block chain whose first 256 blocks are held by 16 workers and the rest by
           one (the shipped gallop + binary-search script, one round trip)
  naive    the baseline, in the same run: the brief's illustrative layout (one ZSET of workers
           per block, ``naive:{m}:blk:<hex>``, built over the same 1M records) walked block by
           block in Lua, one ZRANGEBYSCORE per block
  record   a 2,048-block chain new to a worker that is full (so the call also trims 2,048
           old blocks), and the same chain touched again (the common dispatch case)
  memory   used_memory delta per residency record while building the index

Latencies are client round trips on loopback. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from kvrouter.bench.common import emit_json, percentile, print_table, redis_server
from kvrouter.index.connection import connect
from kvrouter.index.scripts import ResidencyIndex

MODEL = "bench-model"
TTL_MS = 3_600_000

# The baseline: what a lookup costs without the prefix property, one block at a time.
NAIVE_LOOKUP = """
local now = tonumber(ARGV[1])
local chain = ARGV[2]
local n = #chain / 16
local alive, depth = nil, {}
for i = 1, n do
  local key = KEYS[1] .. string.sub(chain, (i-1)*16+1, i*16)
  local ws = redis.call('ZRANGEBYSCORE', key, now, '+inf')
  local next_alive = {}
  local any = false
  for _, w in ipairs(ws) do
    if alive == nil or alive[w] then next_alive[w] = true; depth[w] = i; any = true end
  end
  alive = next_alive
  if not any then break end
end
local flat = {}
for w, d in pairs(depth) do flat[#flat+1] = w; flat[#flat+1] = d end
return flat
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer timed iterations (under 60 s)")
    parser.add_argument("--records", type=int, default=1_000_000, help="index size to build")
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7)


def run(args: argparse.Namespace) -> int:
    if args.records < 1 or args.workers < 17:
        raise SystemExit("--records must be >= 1 and --workers >= 17 (16 share the probe chain)")
    with redis_server() as url:
        result = asyncio.run(_bench(url, args))
    emit_json(result)
    return 0


def _rand_chain(rng: random.Random, n: int) -> list[int]:
    return [rng.getrandbits(64) for _ in range(n)]


NAIVE_PREFIX = "naive:{" + MODEL + "}:blk:"


async def _populate(
    idx: ResidencyIndex, rng: random.Random, workers: list[str], records: int
) -> list[tuple[str, list[int]]]:
    """Record chains until every worker holds records/len(workers) distinct blocks."""
    shared = [_rand_chain(rng, rng.randint(32, 256)) for _ in range(32)]
    per_worker = -(-records // len(workers))
    written: list[tuple[str, list[int]]] = []
    for w in workers:
        held: set[int] = set()
        calls = []
        while len(held) < per_worker:
            tail = _rand_chain(rng, rng.randint(64, 1024))
            chain = (rng.choice(shared) + tail) if rng.random() < 0.5 else tail
            new = [k for k in chain if k not in held]
            chain = chain[: len(chain) - max(0, len(held) + len(new) - per_worker)]
            held.update(chain)
            calls.append(idx.record_call(MODEL, w, chain, ttl_new_ms=TTL_MS))
            written.append((w, chain))
        await idx.run_pipeline(calls)
    return written


async def _populate_naive(client: Any, written: list[tuple[str, list[int]]]) -> None:
    """The same records in the baseline's layout: one ZSET of workers per block."""
    expiry = int(time.time() * 1000) + TTL_MS
    pipe = client.pipeline(transaction=False)
    queued = 0
    for w, chain in written:
        for k in chain:
            pipe.zadd(f"{NAIVE_PREFIX}{k:016x}", {w: expiry})
            queued += 1
            if queued >= 20_000:
                await pipe.execute()
                queued = 0
    await pipe.execute()


async def _time(n: int, fn: Any) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def _bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    client = connect(url)
    try:
        await client.flushall()
        idx = ResidencyIndex(client)
        await idx.load()
        keys = idx.keys(MODEL)
        workers = [f"worker-{i:02d}" for i in range(args.workers)]

        mem0 = int((await client.info("memory"))["used_memory"])
        t0 = time.perf_counter()
        written = await _populate(idx, rng, workers, args.records)
        build_s = time.perf_counter() - t0
        mem1 = int((await client.info("memory"))["used_memory"])
        pipe = client.pipeline(transaction=False)
        for w in workers:
            pipe.zcard(keys.worker(w))
        records = sum(await pipe.execute())
        bytes_per_record = (mem1 - mem0) / records

        # The probe chain: 16 workers hold its first 256 blocks, one of them holds all 2,048.
        probe = _rand_chain(rng, 2048)
        probe_records = [(w, probe[:256]) for w in workers[1:16]] + [(workers[0], probe)]
        for w, chain in probe_records:
            await idx.record(MODEL, w, chain, ttl_new_ms=TTL_MS)
        await _populate_naive(client, written + probe_records)
        mem2 = int((await client.info("memory"))["used_memory"])
        naive_bytes_per_record = (mem2 - mem1) / (records + 16 * 256 + 2048 - 256)
        got = await idx.lookup(MODEL, probe)
        expect = {w: 256 for w in workers[1:16]} | {workers[0]: 2048}
        if got.depths != expect:
            raise SystemExit(f"lookup returned wrong depths: {got.depths}")

        naive_sha = await client.script_load(NAIVE_LOOKUP)
        packed = "".join(f"{k:016x}" for k in probe)

        async def naive() -> Any:
            now = int(time.time() * 1000)
            return await client.evalsha(naive_sha, 1, NAIVE_PREFIX, now, packed)

        naive_check = await naive()
        naive_depths = {
            naive_check[i]: int(naive_check[i + 1]) for i in range(0, len(naive_check), 2)
        }
        if naive_depths != expect:
            raise SystemExit(f"naive baseline returned wrong depths: {naive_depths}")

        n_lookup = 300 if args.quick else 2000
        n_naive = 40 if args.quick else 200
        n_record = 60 if args.quick else 400
        lookup_ms = await _time(n_lookup, lambda: idx.lookup(MODEL, probe))
        naive_ms = await _time(n_naive, naive)

        # Record: a new 2,048-block chain on a worker kept at capacity (trims as many blocks).
        target = workers[-1]
        capacity = int(await client.zcard(keys.worker(target)))
        fresh = [_rand_chain(rng, 2048) for _ in range(n_record)]
        it = iter(fresh)
        record_ms = await _time(
            n_record,
            lambda: idx.record(MODEL, target, next(it), ttl_new_ms=TTL_MS, capacity=capacity),
        )
        touch_chain = fresh[-1]
        touch_ms = await _time(
            n_record,
            lambda: idx.record(
                MODEL,
                target,
                touch_chain,
                ttl_new_ms=TTL_MS,
                ttl_held_ms=TTL_MS + 60_000,
                capacity=capacity,
            ),
        )
        info = await client.info("server")
    finally:
        await client.aclose()

    lookup_p50 = percentile(lookup_ms, 50)
    naive_p50 = percentile(naive_ms, 50)
    rows = [
        ("index records", f"{records:,}", f"{args.workers} workers, built in {build_s:.1f} s"),
        ("bytes per record", f"{bytes_per_record:.0f}", "used_memory delta / records"),
        (
            "naive layout bytes/record",
            f"{naive_bytes_per_record:.0f}",
            "one ZSET per block (baseline)",
        ),
        (
            "lookup 2,048 p50 / p99",
            f"{lookup_p50:.3f} / {percentile(lookup_ms, 99):.3f} ms",
            f"{n_lookup} runs",
        ),
        (
            "naive lookup p50 / p99",
            f"{naive_p50:.3f} / {percentile(naive_ms, 99):.3f} ms",
            f"{n_naive} runs",
        ),
        ("lookup speed-up", f"{naive_p50 / lookup_p50:.1f}x", "naive p50 / lookup p50"),
        (
            "record 2,048 new p50 / p99",
            f"{percentile(record_ms, 50):.3f} / {percentile(record_ms, 99):.3f} ms",
            "at capacity: trims 2,048",
        ),
        ("record 2,048 touch p50", f"{percentile(touch_ms, 50):.3f} ms", "chain already held"),
    ]
    print(f"kvrouter bench index (redis {info['redis_version']}, quick={args.quick})")
    print_table(rows, ("measure", "value", "note"))
    return {
        "bench": "index",
        "quick": bool(args.quick),
        "redis_version": info["redis_version"],
        "records": records,
        "workers": args.workers,
        "lookup_2048_p50_ms": round(lookup_p50, 4),
        "lookup_2048_p99_ms": round(percentile(lookup_ms, 99), 4),
        "naive_lookup_2048_p50_ms": round(naive_p50, 4),
        "lookup_speedup": round(naive_p50 / lookup_p50, 2),
        "record_2048_p50_ms": round(percentile(record_ms, 50), 4),
        "record_2048_p99_ms": round(percentile(record_ms, 99), 4),
        "record_touch_2048_p50_ms": round(percentile(touch_ms, 50), 4),
        "bytes_per_record": round(bytes_per_record, 1),
        "naive_bytes_per_record": round(naive_bytes_per_record, 1),
    }
