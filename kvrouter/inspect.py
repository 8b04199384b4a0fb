"""`kvrouter inspect`: the operator's view of the shared index, read from Redis.

Read-only: it sends only read commands (SCAN, ZCARD, ZCOUNT, ZRANGE, ZSCORE, HGETALL, TIME),
so it runs as a Redis user with ``+@read`` and nothing else (tests/test_inspect.py does so).
Every figure says which keys it read: ``--json`` puts the commands next to each figure under
``"read"``, and the table prints them under each section. Per model:

* each worker's resident blocks (live records), its capacity use (capacity from the worker
  registry, or ``--capacity-blocks``), the oldest and newest record (a record's score is its
  valid-until time; the access that wrote it was ``--record-ttl-s`` before that for records
  the router saw held, less for speculative ones), its holes, in-flight requests and leases;
* the most shared prefixes: chain heads held by the most workers, with the depth the holders
  share (block keys are chained hashes, so equal keys at a depth mean an equal prefix);
* which listener replica owns each worker's events, how long its lease has left, the age of
  its heartbeat (its lag: a listener that stopped beating applies nothing) and the engine
  batch it applied last.

Times come from the Redis server's clock (``TIME``), the clock the scripts write with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import RedisError

from kvrouter.index.connection import connect, redact_url
from kvrouter.index.keys import KeySchema

MAX_CHAIN = 4096
"""Deepest chain followed when measuring a shared prefix (blocks)."""


@dataclass
class WorkerView:
    worker: str
    resident_blocks: int
    stored_records: int
    capacity_blocks: int | None
    capacity_use: float | None
    oldest_valid_until_ms: int | None
    newest_valid_until_ms: int | None
    oldest_access_s_ago: float | None
    newest_access_s_ago: float | None
    holes: int
    in_flight: int
    queued_prefill_tokens: int
    leases: int
    read: dict[str, str] = field(default_factory=dict)


@dataclass
class SharedPrefix:
    head: str
    workers: list[str]
    shared_depth: int
    deepest: int
    read: dict[str, str] = field(default_factory=dict)


@dataclass
class ModelView:
    model: str
    workers: list[WorkerView]
    shared_prefixes: list[SharedPrefix]
    heads_scanned: int
    read: dict[str, str] = field(default_factory=dict)


@dataclass
class OwnerView:
    worker: str
    owner: str
    epoch: int
    lease_left_ms: int
    owner_heartbeat_age_ms: int | None
    applied: dict[str, str]
    """Model -> "<epoch>:<seq>", the engine batch last applied for the worker there."""
    read: dict[str, str] = field(default_factory=dict)


@dataclass
class IndexView:
    redis_time_ms: int
    models: list[ModelView]
    listeners: dict[str, int]
    """Listener replica -> heartbeat age (ms)."""
    owners: list[OwnerView]
    read: dict[str, str] = field(default_factory=dict)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def _scan(client: Any, pattern: str, limit: int) -> list[str]:
    out: list[str] = []
    async for key in client.scan_iter(match=pattern, count=1000):
        out.append(_s(key))
        if len(out) >= limit:
            break
    return out


def _model_of(key: str, prefix: str) -> str:
    # "<prefix>:{<model>}:<rest>": the model is between the first "{" and the last "}".
    return key[len(prefix) + 2 : key.rindex("}")]


async def _chain(client: Any, wrk: str, top: float) -> list[str]:
    """The blocks recorded with a head scored `top`: scores top, top-1, top-2 ... (us)."""
    rows = await client.zrevrangebyscore(
        wrk, top, top - MAX_CHAIN + 1, withscores=True, start=0, num=MAX_CHAIN
    )
    chain: list[str] = []
    for member, score in rows:
        if int(score) != int(top) - len(chain):
            break
        chain.append(_s(member))
    return chain


async def inspect_index(
    client: Any,
    schema: KeySchema,
    *,
    models: Sequence[str] = (),
    top: int = 10,
    max_heads: int = 10000,
    record_ttl_s: float = 600.0,
    capacity_blocks: int = 0,
) -> IndexView:
    """Read the index (read commands only) and summarise it; see the module docstring."""
    sec, usec = await client.time()
    now_us = int(sec) * 1_000_000 + int(usec)
    now_ms = now_us // 1000
    p = schema.prefix
    found = set(models)
    if not found:
        for pattern in (f"{p}:{{*}}:workers", f"{p}:{{*}}:lease"):
            found.update(_model_of(k, p) for k in await _scan(client, pattern, 100000))
    registry = {_s(k): _s(v) for k, v in (await client.hgetall(schema.registry)).items()}
    capacities: dict[str, int] = {}
    for wid, desc in registry.items():
        try:
            capacities[wid] = int(json.loads(desc).get("capacity_blocks") or 0)
        except (ValueError, AttributeError):
            continue
    view = IndexView(
        redis_time_ms=now_ms,
        models=[],
        listeners={},
        owners=[],
        read={
            "redis_time_ms": "TIME",
            "models": f"SCAN MATCH {p}:{{*}}:workers, {p}:{{*}}:lease (or --model)",
        },
    )
    for model in sorted(found):
        view.models.append(
            await _model_view(
                client,
                schema,
                model,
                now_us,
                top,
                max_heads,
                record_ttl_s,
                capacity_blocks,
                capacities,
            )
        )
    # Listener replicas heartbeat per base model (each serves one).
    live_key = schema.model("<model>").listeners
    for model in sorted(found):
        beats = await client.zrange(schema.model(model).listeners, 0, -1, withscores=True)
        view.listeners.update({_s(m): now_ms - int(s) for m, s in beats})
    view.read["listeners"] = f"ZRANGE {live_key} 0 -1 WITHSCORES (each model)"
    for key in sorted(await _scan(client, f"{p}:listener:owner:*", 100000)):
        h = {_s(k): _s(v) for k, v in (await client.hgetall(key)).items()}
        worker = key[len(f"{p}:listener:owner:") :]
        owner = h.get("owner", "")
        applied: dict[str, str] = {}
        read = {
            "owner, epoch, lease_left_ms": f"HGETALL {key}",
            "owner_heartbeat_age_ms": f"ZSCORE {live_key} <owner>",
        }
        for f in sorted(h):
            if f.startswith("ns:"):
                mk = schema.model(f[3:])
                seq = await client.hget(mk.listener_seq, worker)
                if seq is not None:
                    applied[f[3:]] = _s(seq)
                read[f"applied[{f[3:]}]"] = f"HGET {mk.listener_seq} {worker}"
        view.owners.append(
            OwnerView(
                worker=worker,
                owner=owner,
                epoch=int(h.get("epoch", 0) or 0),
                lease_left_ms=int(h.get("until", 0) or 0) - now_ms,
                owner_heartbeat_age_ms=view.listeners.get(owner),
                applied=applied,
                read=read,
            )
        )
    return view


async def _model_view(
    client: Any,
    schema: KeySchema,
    model: str,
    now_us: int,
    top: int,
    max_heads: int,
    record_ttl_s: float,
    capacity_default: int,
    capacities: dict[str, int],
) -> ModelView:
    k = schema.model(model)
    names = {_s(m) for m in await client.zrange(k.workers, 0, -1)}
    load = {_s(f): int(v) for f, v in (await client.hgetall(k.load)).items()}
    leases: dict[str, int] = {}
    for member in await client.zrangebyscore(k.leases, now_us, "+inf"):
        wid = _s(member).split("|", 1)[0]
        leases[wid] = leases.get(wid, 0) + 1
    names.update(leases)
    names.update(f for f in load if not f.endswith("|pf"))
    now_ms = now_us // 1000

    def ago(valid_until_ms: int | None) -> float | None:
        """Seconds since the access that wrote a record valid until `valid_until_ms`."""
        if valid_until_ms is None:
            return None
        return round((now_ms - (valid_until_ms - record_ttl_s * 1000)) / 1000, 3)

    workers = []
    for w in sorted(names):
        wrk, cut = k.worker(w), k.cut(w)
        resident = int(await client.zcount(wrk, now_us, "+inf"))
        stored = int(await client.zcard(wrk))
        oldest = await client.zrangebyscore(wrk, now_us, "+inf", start=0, num=1, withscores=True)
        newest = await client.zrevrange(wrk, 0, 0, withscores=True)
        old_ms = int(oldest[0][1]) // 1000 if oldest else None
        new_ms = int(newest[0][1]) // 1000 if newest and resident else None
        cap = capacities.get(w) or capacity_default or None
        workers.append(
            WorkerView(
                worker=w,
                resident_blocks=resident,
                stored_records=stored,
                capacity_blocks=cap,
                capacity_use=round(resident / cap, 4) if cap else None,
                oldest_valid_until_ms=old_ms,
                newest_valid_until_ms=new_ms,
                oldest_access_s_ago=ago(old_ms),
                newest_access_s_ago=ago(new_ms),
                holes=int(await client.zcount(cut, now_us, "+inf")),
                in_flight=load.get(w, 0),
                queued_prefill_tokens=load.get(f"{w}|pf", 0),
                leases=leases.get(w, 0),
                read={
                    "resident_blocks": f"ZCOUNT {wrk} <now us> +inf",
                    "stored_records": f"ZCARD {wrk}",
                    "capacity_blocks": f"HGET {schema.registry} {w} (capacity_blocks) "
                    "or --capacity-blocks",
                    "oldest_valid_until_ms": f"ZRANGEBYSCORE {wrk} <now us> +inf LIMIT 0 1",
                    "newest_valid_until_ms": f"ZREVRANGE {wrk} 0 0 WITHSCORES",
                    "holes": f"ZCOUNT {cut} <now us> +inf",
                    "in_flight, queued_prefill_tokens": f"HGETALL {k.load}",
                    "leases": f"ZRANGEBYSCORE {k.leases} <now us> +inf",
                },
            )
        )
    heads = [
        h
        for h in await _scan(client, f"{k.head_prefix}*", max_heads)
        if not h[len(k.head_prefix) :].startswith("@")
    ]
    ranked: list[tuple[int, str, list[tuple[str, float]]]] = []
    for h in heads:
        holders = [
            (_s(m), float(s))
            for m, s in await client.zrangebyscore(h, now_us, "+inf", withscores=True)
        ]
        if holders:
            ranked.append((len(holders), h, holders))
    ranked.sort(key=lambda r: (-r[0], r[1]))
    prefixes = []
    for _, h, holders in ranked[:top]:
        chains = [await _chain(client, k.worker(w), score) for w, score in holders]
        shared = 0
        while all(len(c) > shared for c in chains) and len({c[shared] for c in chains}) == 1:
            shared += 1
        prefixes.append(
            SharedPrefix(
                head=h[len(k.head_prefix) :],
                workers=sorted(w for w, _ in holders),
                shared_depth=shared,
                deepest=max(len(c) for c in chains),
                read={
                    "workers": f"ZRANGEBYSCORE {h} <now us> +inf WITHSCORES",
                    "shared_depth, deepest": f"ZREVRANGEBYSCORE {k.worker_prefix}<worker> "
                    "<head score> <head score - 4095> WITHSCORES, per holder",
                },
            )
        )
    return ModelView(
        model=model,
        workers=workers,
        shared_prefixes=prefixes,
        heads_scanned=len(heads),
        read={
            "workers": f"ZRANGE {k.workers} 0 -1, HGETALL {k.load}, ZRANGEBYSCORE {k.leases}",
            "heads_scanned": f"SCAN MATCH {k.head_prefix}* (at most --max-heads)",
        },
    )


# -- output ------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [headers] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def _reads(read: dict[str, str]) -> list[str]:
    return [f"  read  {name}: {cmd}" for name, cmd in read.items()]


def render_table(view: IndexView) -> str:
    """The human view: one table per section, each followed by the commands it read."""
    out = [f"Redis time {view.redis_time_ms} ms", *_reads(view.read), ""]
    for m in view.models:
        out.append(f"== model {m.model}")
        out += _table(
            [
                "worker",
                "resident",
                "capacity",
                "use",
                "oldest access s ago",
                "newest access s ago",
                "holes",
                "in flight",
                "queued prefill",
                "leases",
            ],
            [
                [
                    w.worker,
                    w.resident_blocks,
                    w.capacity_blocks,
                    w.capacity_use,
                    w.oldest_access_s_ago,
                    w.newest_access_s_ago,
                    w.holes,
                    w.in_flight,
                    w.queued_prefill_tokens,
                    w.leases,
                ]
                for w in m.workers
            ],
        )
        if m.workers:
            out += _reads(m.workers[0].read | m.read)
        out.append("")
        out.append(f"most shared prefixes ({m.heads_scanned} chain heads scanned)")
        out += _table(
            ["head block", "workers", "shared depth", "deepest", "held by"],
            [
                [p.head, len(p.workers), p.shared_depth, p.deepest, ",".join(p.workers)]
                for p in m.shared_prefixes
            ],
        )
        if m.shared_prefixes:
            out += _reads(m.shared_prefixes[0].read)
        out.append("")
    out.append("== listeners")
    out += _table(
        ["worker", "owner", "epoch", "lease left ms", "owner heartbeat age ms", "applied"],
        [
            [
                o.worker,
                o.owner,
                o.epoch,
                o.lease_left_ms,
                o.owner_heartbeat_age_ms,
                " ".join(f"{m}={s}" for m, s in o.applied.items()),
            ]
            for o in view.owners
        ],
    )
    if view.owners:
        out += _reads(view.owners[0].read)
    out += _reads({"owner heartbeat age": view.read["listeners"]})
    return "\n".join(out) + "\n"


# -- command -----------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="the index")
    parser.add_argument("--key-prefix", default="kvr", help="prefix of every key (KVR_KEY_PREFIX)")
    parser.add_argument(
        "--model", action="append", default=[], help="only this model (repeatable; default all)"
    )
    parser.add_argument("--json", action="store_true", help="JSON for scripts, not a table")
    parser.add_argument("--top", type=int, default=10, help="shared prefixes listed per model")
    parser.add_argument(
        "--max-heads", type=int, default=10000, help="chain heads scanned per model, at most"
    )
    parser.add_argument(
        "--record-ttl-s",
        type=float,
        default=600.0,
        help="the routers' KVR_RECORD_TTL_S: access time = valid-until - this",
    )
    parser.add_argument(
        "--capacity-blocks",
        type=int,
        default=0,
        help="capacity of workers the registry does not describe (0 = unknown)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        schema = KeySchema(args.key_prefix)
        client = connect(args.redis_url)
    except ValueError as exc:
        print(f"kvrouter inspect: {exc}", file=sys.stderr)
        return 2

    async def go() -> IndexView:
        try:
            return await inspect_index(
                client,
                schema,
                models=args.model,
                top=args.top,
                max_heads=args.max_heads,
                record_ttl_s=args.record_ttl_s,
                capacity_blocks=args.capacity_blocks,
            )
        finally:
            await client.aclose()

    try:
        view = asyncio.run(go())
    except (OSError, RedisError) as exc:
        print(f"kvrouter inspect: {redact_url(args.redis_url)}: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(asdict(view), indent=2) + "\n" if args.json else render_table(view)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `kvrouter inspect | head`: the reader left; no traceback, and none at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
