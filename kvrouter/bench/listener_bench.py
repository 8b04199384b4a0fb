"""`kvrouter bench listener`: block events per second one listener applies to Redis.

A simulated fleet of vLLM engines (16-token blocks) produces real-format KV-event payloads
(msgpack, positional encoding, u64 hashes), one batch per engine step: multi-block prefill
stores (new chains and continuations of cached prefixes), single-block decode stores, and
tail-first removals once an engine's cache is full (vLLM's LRU frees a request's blocks
tail first). The payloads are built before timing; what is timed is the listener's whole
path from payload bytes to Redis: decode, router keys (xxh3 chain over the token ids),
translation, and the Lua writes, on a private redis-server on loopback.

  listener  the shipped path: ``Applier`` flushes of up to ``--apply-batch`` batches, one
            ``apply_engine_events`` call per worker per flush, one round trip per flush
  baseline  the same decode and key computation, then one Lua call per event
            (``store_engine_blocks`` / ``release_engine_blocks`` / ``clear_worker``),
            awaited one after another, in the same run on the same stream prefix

A block event is one block hash of a BlockStored or BlockRemoved. Both runs end with the
same index (checked), so they did the same work. The last stdout line is one JSON object.

During the full listener run the server's SLOWLOG records every script call slower than
``SLOWLOG_US``: the longest one is how long a single flush's Lua call kept Redis from serving
anything else (lookups included), the figure issue #17 item 9 bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

from eviction_listener.applier import (
    MAX_OPS_PER_CALL,
    Applier,
    InboxItem,
    KeyCache,
    WorkerState,
)
from eviction_listener.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    decode_batch,
)
from eviction_listener.metrics import ListenerMetrics
from eviction_listener.zmq_source import Delivered
from kvrouter.bench.common import emit_json, print_table, redis_server
from kvrouter.bench.vllm_wire import encode_batch
from kvrouter.index.connection import connect
from kvrouter.index.hashing import BlockHasher, extend_chain
from kvrouter.index.keys import KeySchema
from kvrouter.index.scripts import EngineBlock, ResidencyIndex

MODEL = "bench-model"
B = 16
TTL_MS = 3_600_000
# Script calls at least this long (us) are kept by the SLOWLOG during the full run; enough
# entries that none is dropped in a default run (the report says when some were).
SLOWLOG_US = 100
SLOWLOG_LEN = 100_000


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a shorter stream (under a minute)")
    parser.add_argument("--workers", type=int, default=4, help="simulated engines")
    parser.add_argument("--steps", type=int, default=0, help="engine steps per worker")
    parser.add_argument(
        "--capacity", type=int, default=4096, help="blocks per engine before it evicts"
    )
    parser.add_argument("--apply-batch", type=int, default=4096)
    parser.add_argument(
        "--max-ops",
        type=int,
        default=MAX_OPS_PER_CALL,
        help="ops per apply_engine_events call (a huge value: one call per flush, as before)",
    )
    parser.add_argument("--seed", type=int, default=11)


@dataclass
class _Seq:
    hashes: list[int]
    tokens: list[int]


class _Engine:
    """Enough of a vLLM engine to produce a realistic event stream."""

    def __init__(self, rng: random.Random, capacity: int, salt: int) -> None:
        self.rng = rng
        self.capacity = capacity
        self.next_hash = (salt << 40) | 1
        self.cached: list[_Seq] = []  # LRU order, oldest first
        self.running: list[_Seq] = []
        self.blocks = 0
        self.system = [rng.randrange(32_000) for _ in range(4 * B)]

    def _new_hash(self) -> int:
        self.next_hash += 1
        return self.next_hash * 0x9E3779B97F4A7C15 & ((1 << 64) - 1)

    def step(self) -> list[KVEvent]:
        rng = self.rng
        events: list[KVEvent] = []
        # Prefill: a new prompt about once every few steps (shared system prompt + new text,
        # or a follow-up turn continuing a cached conversation).
        if rng.random() < 0.35:
            if self.cached and rng.random() < 0.5:
                base = rng.choice(self.cached)
                n = rng.randint(2, 24)
                parent = base.hashes[-1]
                seq = _Seq(list(base.hashes), list(base.tokens))
            else:
                n = rng.randint(8, 64)
                parent = None
                seq = _Seq([], [])
            toks = [rng.randrange(32_000) for _ in range(n * B)]
            if parent is None:
                toks[: len(self.system)] = self.system
            hs = [self._new_hash() for _ in range(n)]
            events.append(BlockStored(tuple(hs), parent, _arr(toks), B, medium="GPU"))
            seq.hashes += hs
            seq.tokens += toks
            self.blocks += n
            self.running.append(seq)
        # Decode: each running sequence completes a block every 16 tokens.
        for seq in list(self.running):
            if rng.random() < 0.25:
                h = self._new_hash()
                toks = [rng.randrange(32_000) for _ in range(B)]
                events.append(BlockStored((h,), seq.hashes[-1], _arr(toks), B, medium="GPU"))
                seq.hashes.append(h)
                seq.tokens += toks
                self.blocks += 1
            if rng.random() < 0.04:
                self.running.remove(seq)
                self.cached.append(seq)
        # Evict tail first when full (vLLM frees a request's blocks in reverse order).
        while self.blocks > self.capacity and self.cached:
            victim = self.cached[0]
            k = min(len(victim.hashes), rng.randint(1, 16))
            gone = victim.hashes[-k:][::-1]
            del victim.hashes[-k:]
            del victim.tokens[-k * B :]
            self.blocks -= k
            if not victim.hashes:
                self.cached.pop(0)
            events.append(BlockRemoved(tuple(gone), "GPU"))
        return events


def _arr(tokens: list[int]) -> Any:
    from array import array

    return array("I", tokens)


def build_streams(workers: int, steps: int, capacity: int, seed: int) -> list[list[bytes]]:
    """Per worker, its payloads in seq order (the first is AllBlocksCleared, as at a start)."""
    rng = random.Random(seed)
    out: list[list[bytes]] = []
    for w in range(workers):
        eng = _Engine(random.Random(rng.random()), capacity, w + 1)
        payloads = [encode_batch([AllBlocksCleared()], ts=time.time())]
        for _ in range(steps):
            evs = eng.step()
            if evs:
                payloads.append(encode_batch(evs, ts=time.time()))
        out.append(payloads)
    return out


def count_block_events(streams: list[list[bytes]]) -> int:
    n = 0
    for payloads in streams:
        for p in payloads:
            for ev in decode_batch(p).events:
                if isinstance(ev, (BlockStored, BlockRemoved)):
                    n += len(ev.block_hashes)
    return n


async def _fresh(client: Any) -> None:
    await client.flushall()


async def run_listener_path(
    client: Any, streams: list[list[bytes]], apply_batch: int, max_ops: int = MAX_OPS_PER_CALL
) -> float:
    """Seconds for the shipped path to apply every stream (interleaved like a fleet)."""
    index = ResidencyIndex(client)
    await index.load()
    metrics = ListenerMetrics()

    async def register(st: WorkerState, ns: str) -> None:
        await client.hset(KeySchema().listener_owner(st.worker_id), f"ns:{ns}", 1)

    applier = Applier(
        index,
        model=MODEL,
        block_size=B,
        hash_seed="",
        ttl_ms=TTL_MS,
        capacity=0,
        metrics=metrics,
        register_namespace=register,
        max_ops=max_ops,
    )
    states = [
        WorkerState(f"w{i}", 1, B, keys=KeyCache(1 << 17), lora_ns=KeyCache(1024))
        for i in range(len(streams))
    ]
    # Interleave the workers' payloads as a fleet would deliver them.
    order: list[tuple[int, int, bytes]] = []
    longest = max(len(s) for s in streams)
    for j in range(longest):
        for i, s in enumerate(streams):
            if j < len(s):
                order.append((i, j, s[j]))
    t0 = time.perf_counter()
    for start in range(0, len(order), apply_batch):
        chunk = order[start : start + apply_batch]
        items: list[InboxItem] = [
            (states[i], Delivered(states[i].worker_id, j, decode_batch(p))) for i, j, p in chunk
        ]
        await applier.apply(items)
    return time.perf_counter() - t0


async def run_baseline(client: Any, streams: list[list[bytes]]) -> float:
    """Seconds for one Lua call per event, awaited in turn (same decode and keys)."""
    index = ResidencyIndex(client)
    await index.load()
    hasher = BlockHasher(MODEL, B)
    root = hasher.root()
    keymaps: list[dict[int, int]] = [{} for _ in streams]
    longest = max(len(s) for s in streams)
    t0 = time.perf_counter()
    for j in range(longest):
        for i, s in enumerate(streams):
            if j >= len(s):
                continue
            w = f"w{i}"
            km = keymaps[i]
            for ev in decode_batch(s[j]).events:
                if isinstance(ev, BlockStored):
                    pk = root if ev.parent_hash is None else km.get(ev.parent_hash)
                    if pk is None:
                        continue
                    keys = extend_chain(pk, ev.token_ids.tobytes(), B)
                    parents = (ev.parent_hash, *ev.block_hashes[:-1])
                    blocks = [
                        EngineBlock(h, p, k)
                        for h, p, k in zip(ev.block_hashes, parents, keys, strict=True)
                    ]
                    km.update(zip(ev.block_hashes, keys, strict=True))
                    await index.store_engine_blocks(MODEL, w, blocks, ttl_ms=TTL_MS)
                elif isinstance(ev, BlockRemoved):
                    await index.release_engine_blocks(MODEL, w, ev.block_hashes)
                elif isinstance(ev, AllBlocksCleared):
                    await index.clear_worker(MODEL, w)
    return time.perf_counter() - t0


async def _index_state(client: Any, workers: int) -> list[Any]:
    k = KeySchema().model(MODEL)
    out = []
    for i in range(workers):
        out.append(sorted(await client.zrange(k.worker(f"w{i}"), 0, -1)))
        out.append(sorted((await client.hgetall(k.engine_map(f"w{i}"))).items()))
    return out


@dataclass
class ScriptTimes:
    """EVALSHA times on the server during one run (SLOWLOG and INFO commandstats)."""

    calls: int
    mean_us: float
    longest_us: int
    over_10ms: int
    complete: bool
    """False when the SLOWLOG filled up, so the longest may have been dropped."""


async def _start_script_times(client: Any) -> dict[str, str]:
    """Reset the SLOWLOG and command stats; returns the settings to restore (a REDIS_URL
    server is someone else's)."""
    old = {
        k: str(v)
        for k, v in (await client.config_get("slowlog-*")).items()
        if k in ("slowlog-log-slower-than", "slowlog-max-len")
    }
    await client.config_set("slowlog-log-slower-than", SLOWLOG_US)
    await client.config_set("slowlog-max-len", SLOWLOG_LEN)
    await client.slowlog_reset()
    await client.config_resetstat()
    return old


async def _script_times(client: Any) -> ScriptTimes:
    entries = await client.slowlog_get(SLOWLOG_LEN)
    durations = []
    for e in entries:
        cmd = e["command"]
        name = (cmd.decode() if isinstance(cmd, bytes) else str(cmd)).split(" ", 1)[0]
        if name.upper() in ("EVALSHA", "EVAL"):
            durations.append(int(e["duration"]))
    stats = await client.info("commandstats")
    ev = stats.get("cmdstat_evalsha", {"calls": 0, "usec_per_call": 0.0})
    return ScriptTimes(
        calls=int(ev["calls"]),
        mean_us=float(ev["usec_per_call"]),
        longest_us=max(durations, default=0),
        over_10ms=sum(1 for d in durations if d >= 10_000),
        complete=len(entries) < SLOWLOG_LEN,
    )


async def _bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    steps = args.steps or (1500 if args.quick else 6000)
    streams = build_streams(args.workers, steps, args.capacity, args.seed)
    # The baseline runs on a prefix of each stream (it is slow); both paths are also run on
    # that same prefix so the two indexes can be compared for equality.
    base_steps = max(50, steps // (8 if args.quick else 12))
    prefix = [s[:base_steps] for s in streams]
    total_events = count_block_events(streams)
    prefix_events = count_block_events(prefix)
    client = connect(url)
    try:
        await _fresh(client)
        t_prefix = await run_listener_path(client, prefix, args.apply_batch, args.max_ops)
        state_fast = await _index_state(client, args.workers)
        await _fresh(client)
        t_base = await run_baseline(client, prefix)
        state_base = await _index_state(client, args.workers)
        if state_fast != state_base:
            raise SystemExit("listener and baseline built different indexes: a bug")
        await _fresh(client)
        old = await _start_script_times(client)
        try:
            t_full = await run_listener_path(client, streams, args.apply_batch, args.max_ops)
            times = await _script_times(client)
        finally:
            for k, v in old.items():
                await client.config_set(k, v)
    finally:
        await client.aclose()
    fast = total_events / t_full
    fast_prefix = prefix_events / t_prefix
    base = prefix_events / t_base
    batches = sum(len(s) for s in streams)
    print_table(
        [
            ("listener", f"{fast:,.0f}", f"{total_events:,} block events, {batches:,} batches"),
            ("listener (baseline's prefix)", f"{fast_prefix:,.0f}", f"{prefix_events:,}"),
            ("baseline: one Lua call per event", f"{base:,.0f}", f"{prefix_events:,}"),
        ],
        ("path", "block events/s", "work"),
    )
    print(f"speedup over the baseline (same prefix): {fast_prefix / base:.1f}x")
    longest = f"{times.longest_us / 1000:.1f} ms" if times.longest_us else f"< {SLOWLOG_US} us"
    print(
        f"listener script calls: {times.calls:,}, mean {times.mean_us:,.0f} us, longest "
        f"{longest}{'' if times.complete else ' (SLOWLOG full: may be more)'}, "
        f"{times.over_10ms:,} over 10 ms"
    )
    return {
        "bench": "listener",
        "quick": bool(args.quick),
        "workers": args.workers,
        "batches": batches,
        "block_events": total_events,
        "block_events_per_s": round(fast, 1),
        "baseline_block_events": prefix_events,
        "baseline_block_events_per_s": round(base, 1),
        "listener_same_prefix_per_s": round(fast_prefix, 1),
        "speedup": round(fast_prefix / base, 2),
        "max_ops": args.max_ops,
        "script_calls": times.calls,
        "script_mean_us": round(times.mean_us, 1),
        "script_longest_us": times.longest_us,
        "scripts_over_10ms": times.over_10ms,
        "slowlog_complete": times.complete,
    }


def run(args: argparse.Namespace) -> int:
    if (
        args.workers < 1
        or args.capacity < 64
        or args.apply_batch < 1
        or args.steps < 0
        or args.max_ops < 1
    ):
        raise SystemExit("--workers, --apply-batch and --max-ops must be >= 1, --capacity >= 64")
    with redis_server() as url:
        result = asyncio.run(_bench(url, args))
    emit_json(result)
    return 0
