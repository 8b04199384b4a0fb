"""KV event decode throughput: ``decode_batch`` against bare ``msgpack.unpackb`` of the same
payloads (the floor any Python decoder pays), on realistic engine-step batches.

The listener's target is 50,000 block events per second on 2 cores including Redis writes, so
this reports, per batch mix, blocks decoded per second and the share of one core that 50k
blocks/s of decoding would take. Run: ``python -m kvrouter.bench.decode_bench [--quick]``.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from array import array
from collections.abc import Callable, Sequence
from functools import partial

import msgpack

from eviction_listener.events import BlockRemoved, BlockStored, KVEvent, decode_batch
from kvrouter.bench.vllm_wire import FIELDS_V0_10, encode_batch

TARGET_BLOCKS_PER_S = 50_000
BLOCK = 16


def _stored(rng: random.Random, n_blocks: int, parent: bool = True) -> BlockStored:
    return BlockStored(
        tuple(rng.getrandbits(64) for _ in range(n_blocks)),
        rng.getrandbits(64) if parent else None,
        array("I", (rng.randrange(152_000) for _ in range(n_blocks * BLOCK))),
        BLOCK,
        medium="GPU",
        group_idx=0,
        extra_keys=(None,) * n_blocks,
        kv_cache_spec_kind="full_attention",
    )


def vllm_step(rng: random.Random) -> list[KVEvent]:
    """One busy vLLM step: a 512-token prefill chunk (32 blocks), 6 running requests completing
    a block each, 8 lazily evicted blocks (one BlockRemoved per hash, as vLLM emits them)."""
    events: list[KVEvent] = [_stored(rng, 32, parent=False)]
    events += [_stored(rng, 1) for _ in range(6)]
    events += [BlockRemoved((rng.getrandbits(64),), "GPU", 0) for _ in range(8)]
    return events


def sglang_pages(rng: random.Random) -> list[KVEvent]:
    """SGLang's shape: one BlockStored per page, so every block pays the per-event cost."""
    events: list[KVEvent] = [
        BlockStored(
            (rng.getrandbits(64),),
            rng.getrandbits(64),
            array("I", (rng.randrange(152_000) for _ in range(BLOCK))),
            BLOCK,
            medium="GPU",
        )
        for _ in range(16)
    ]
    events += [BlockRemoved((rng.getrandbits(64),), "GPU") for _ in range(8)]
    return events


def _blocks(events: Sequence[KVEvent]) -> int:
    return sum(len(e.block_hashes) for e in events if isinstance(e, BlockStored | BlockRemoved))


def _rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second, best of three runs of about ``seconds`` each."""
    best = 0.0
    for _ in range(3):
        n = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for _ in range(50):
                fn()
            n += 50
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, n / (now - start))
    return best


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 3 s total)")


def run(args: argparse.Namespace) -> int:
    rng = random.Random(42)
    seconds = 0.3 if args.quick else 1.5
    step = vllm_step(rng)
    pages = sglang_pages(rng)
    mixes: dict[str, tuple[list[KVEvent], bytes]] = {
        "vllm_positional_u64": (step, encode_batch(step, ts=1.0)),
        "vllm_map_u64": (step, encode_batch(step, ts=1.0, encoding="map")),
        "vllm_positional_bytes": (step, encode_batch(step, ts=1.0, hash_format="bytes")),
        "sglang_pages_i64": (
            pages,
            encode_batch(pages, ts=1.0, hash_format="i64", fields=FIELDS_V0_10),
        ),
    }
    results: dict[str, dict[str, float]] = {}
    print(f"{'mix':24} {'bytes':>6} {'blocks':>6} {'unpack us':>10} {'decode us':>10} "
          f"{'ratio':>6} {'blocks/s':>10} {'core@50k':>8}")  # fmt: skip
    for name, (events, payload) in mixes.items():
        if decode_batch(payload).events != tuple(events):
            raise AssertionError(f"{name}: decoded events differ from what was encoded")
        blocks = _blocks(events)
        unpack_rate = _rate(partial(msgpack.unpackb, payload, raw=False), seconds)
        decode_rate = _rate(partial(decode_batch, payload), seconds)
        blocks_per_s = decode_rate * blocks
        row = {
            "payload_bytes": len(payload),
            "blocks_per_batch": blocks,
            "events_per_batch": len(events),
            "unpack_us": 1e6 / unpack_rate,
            "decode_us": 1e6 / decode_rate,
            "ratio_vs_unpack": unpack_rate / decode_rate,
            "blocks_per_s": blocks_per_s,
            "events_per_s": decode_rate * len(events),
            "core_share_at_50k_blocks_per_s": TARGET_BLOCKS_PER_S / blocks_per_s,
        }
        results[name] = row
        print(f"{name:24} {len(payload):6d} {blocks:6d} {row['unpack_us']:10.1f} "
              f"{row['decode_us']:10.1f} {row['ratio_vs_unpack']:6.2f} {blocks_per_s:10.0f} "
              f"{row['core_share_at_50k_blocks_per_s']:8.1%}")  # fmt: skip
    print(json.dumps({"bench": "decode", "quick": bool(args.quick), "mixes": results}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
