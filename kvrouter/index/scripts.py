"""Lua scripts: loading from package data, EVALSHA with NOSCRIPT reload, typed wrappers.

Scripts live in ``lua/`` as ``verb_noun-N.lua`` (N = number of KEYS). ``_lib.lua`` is
spliced in after each script's header comment, so the shared helpers exist once in the source
tree and every script is still a single body for EVALSHA. ``ResidencyIndex`` is the only
Python that calls them: it validates arguments (raising ``ScriptArgumentError`` naming the
argument), packs chains compactly, and decodes replies into dataclasses.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sys
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from kvrouter.index.connection import PackedArgs, accepts_packed_args
from kvrouter.index.errors import IndexError_, ScriptArgumentError, ScriptErrorCode, from_reply
from kvrouter.index.hashing import key_hex
from kvrouter.index.keys import KeyNameError, KeySchema, ModelKeys, validate_worker_id
from kvrouter.index.resp import zadd_pairs

log = logging.getLogger(__name__)

# Bounds a caller cannot exceed in one call: they keep a script's run time, and so Redis's
# pause for everyone else, bounded.
MAX_CHAIN_BLOCKS = 1 << 17
MAX_LEASE_TTL_MS = 24 * 3600 * 1000
MAX_TTL_MS = 366 * 24 * 3600 * 1000
# How often a ResidencyIndex re-reads the Redis server's clock (``server_now_us``).
CLOCK_REFRESH_S = 30.0
_U64 = (1 << 64) - 1
_LEASE_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
_SCRIPT_FILE = re.compile(r"^([a-z_]+)-(\d+)\.lua$")


@dataclass(frozen=True, slots=True)
class LuaScript:
    name: str
    num_keys: int
    source: str
    read_only: bool
    sha: str = field(init=False, repr=False)
    """SHA1 of the source, as EVALSHA names it: computed once here, not on every call (it
    was a property that hashed the ~10 kB source for each EVALSHA on the request path)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


def _splice(source: str, lib: str) -> str:
    """Insert the shared library after the script's shebang line and header comment."""
    lines = source.splitlines(keepends=True)
    head = ""
    if lines and lines[0].startswith("#!"):
        head, lines = lines[0], lines[1:]
    body = "".join(lines)
    end = body.find("]]")
    if not body.lstrip().startswith("--[[") or end < 0:
        raise ValueError("every script must open with a --[[ header ]] comment")
    end += 2
    return head + body[:end] + "\n" + lib + body[end:]


@cache
def load_scripts() -> dict[str, LuaScript]:
    """All scripts shipped in the package, by name (e.g. ``lookup_chain``)."""
    pkg = resources.files("kvrouter.lua")
    lib = (pkg / "_lib.lua").read_text(encoding="utf-8")
    out: dict[str, LuaScript] = {}
    for entry in pkg.iterdir():
        m = _SCRIPT_FILE.match(entry.name)
        if not m:
            continue
        raw = entry.read_text(encoding="utf-8")
        out[m.group(1)] = LuaScript(
            name=m.group(1),
            num_keys=int(m.group(2)),
            source=_splice(raw, lib),
            read_only=raw.startswith("#!lua flags=no-writes"),
        )
    return out


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _worker(worker: str) -> str:
    try:
        return validate_worker_id(worker)
    except KeyNameError as exc:
        raise ScriptArgumentError("worker", str(exc), ScriptErrorCode.BAD_WORKER) from None


def _nonneg(name: str, value: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScriptArgumentError(name, f"must be an integer, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ScriptArgumentError(name, f"must be {bound}, got {value}")
    return value


def _pack_keys(name: str, keys: Sequence[int]) -> str:
    """Keys as 16 hex digits each, back to back. array('Q') checks types and the u64 range in
    C, an order of magnitude faster than formatting each key in Python."""
    if len(keys) > MAX_CHAIN_BLOCKS:
        raise ScriptArgumentError(
            name, f"at most {MAX_CHAIN_BLOCKS} blocks per call, got {len(keys)}"
        )
    try:
        arr = array("Q", keys)
    except (OverflowError, TypeError):
        raise ScriptArgumentError(name, "block keys must be unsigned 64-bit integers") from None
    if sys.byteorder == "little":
        arr.byteswap()
    return arr.tobytes().hex()


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    requests: int = 0
    prefill_tokens: int = 0


@dataclass(frozen=True, slots=True)
class LookupResult:
    depths: dict[str, int]
    """Worker -> blocks of the chain it holds, from the head (only workers with >= 1)."""
    load: dict[str, WorkerLoad]
    probes: int

    def depth(self, worker: str) -> int:
        return self.depths.get(worker, 0)


@dataclass(frozen=True, slots=True)
class RecordResult:
    added: int
    refreshed: int
    evicted: int
    expired: int


@dataclass(frozen=True, slots=True)
class EngineBlock:
    """One block of a BlockStored event, mapped to the router's key."""

    engine_hash: int
    parent_hash: int | None
    router_key: int


@dataclass(frozen=True, slots=True)
class StoreResult:
    stored: int
    duplicates: int
    added: int
    refreshed: int
    evicted: int
    expired: int


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    released: int
    removed: int
    unknown: int
    holes: int


APPLIED = 1
ALREADY_APPLIED = 0
FENCED = -1
_OPS = re.compile(r"^[RSDC]*$")


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """Reply of apply_engine_events: ``status`` is APPLIED, ALREADY_APPLIED or FENCED."""

    status: int
    stored: int = 0
    duplicates: int = 0
    released: int = 0
    removed: int = 0
    unknown: int = 0
    holes: int = 0
    clears: int = 0
    added: int = 0
    refreshed: int = 0
    evicted: int = 0
    expired: int = 0


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """Reply of claim_worker: ``claimed`` False means a newer epoch is stored (fenced)."""

    claimed: bool
    seq: int
    """Last engine batch applied for the worker in the model; -1 = no resume point."""


@dataclass(frozen=True, slots=True)
class OwnerLease:
    """Reply of own_worker."""

    held: bool
    """The caller holds the lease (or, for a release, gave it up)."""
    epoch: int
    owner: str
    until_ms: int
    models: tuple[str, ...]
    """Models the worker's events were written under by any owner (where to claim it)."""


def pack_u64(values: Sequence[int]) -> str:
    """u64 values as 16 lowercase hex digits each, back to back (one C pass, no per-value
    formatting). Raises ScriptArgumentError for values outside [0, 2**64)."""
    try:
        arr = array("Q", values)
    except (OverflowError, TypeError):
        raise ScriptArgumentError("fields", "must be unsigned 64-bit integers") from None
    if sys.byteorder == "little":
        arr.byteswap()
    return arr.tobytes().hex()


@dataclass(slots=True)
class ScriptCall:
    """One prepared EVALSHA, so several can share a pipeline (one round trip)."""

    script: LuaScript
    keys: list[str]
    args: list[str | int]
    decode: Any = field(default=None)


@dataclass(slots=True)
class RecordCall:
    """One prepared record (see ``ResidencyIndex.record_call`` and record_chain-4.lua).

    Three commands, sent in order on one connection: ZCARD of the worker's set, a plain
    ``ZADD GT CH`` of every block with its score, and the record_chain script that finishes
    the record. Redis parses the ZADD's thousands of arguments natively; passing them through
    a Lua script cost three times as much server time (docs/benchmarks.md).
    """

    script: LuaScript
    keys: list[str]
    worker: str
    packed: str
    now_ms: int
    ttl_new_us: int
    ttl_held_us: int
    held: int
    capacity: int
    limit: int
    encoded: bool = False
    """Send the ZADD's pairs pre-encoded (``PackedArgs``): the client accepts them."""

    @property
    def blocks(self) -> int:
        return len(self.packed) // 16

    def zadd_args(self, now_us: int) -> tuple[list[Any], int]:
        """The ZADD's arguments for this record's blocks and the highest score among them.

        Block i (from 0) scores now + ttl - i: the first `held` blocks with ttl_held, the rest
        with ttl_new, so each block is 1 us older than its parent.
        """
        n = self.blocks
        held = min(self.held, n)
        hi_held = now_us + (self.ttl_held_us or self.ttl_new_us)
        hi_new = now_us + self.ttl_new_us
        # The highest score written: the head's, or the first new block's if it outlives it.
        top = hi_new if held == 0 else max(hi_held, hi_new - held) if held < n else hi_held
        if self.encoded:
            data = zadd_pairs([(hi_held, held), (hi_new - held, n - held)], self.packed.encode())
            if data is not None:
                return ["ZADD", self.keys[0], "GT", "CH", PackedArgs(2 * n, data)], top
        scores = list(range(hi_held, hi_held - held, -1))
        scores.extend(range(hi_new - held, hi_new - n, -1))
        p = self.packed
        flat: list[Any] = [None] * (2 * n)
        flat[0::2] = scores
        flat[1::2] = [p[i : i + 16] for i in range(0, 16 * n, 16)]
        return ["ZADD", self.keys[0], "GT", "CH", *flat], top

    def tail(self, now_us: int, top: int) -> ScriptCall:
        return ScriptCall(
            self.script,
            self.keys,
            [self.worker, self.packed, now_us, top, self.capacity, self.limit],
        )

    def commands(self, now_us: int) -> tuple[list[Any], list[Any] | None, ScriptCall]:
        """ZCARD, the ZADD (None for an empty chain) and the finishing script call."""
        if self.now_ms:
            now_us = self.now_ms * 1000
        zcard: list[Any] = ["ZCARD", self.keys[0]]
        if not self.blocks:
            return zcard, None, self.tail(now_us, 0)
        zadd, top = self.zadd_args(now_us)
        return zcard, zadd, self.tail(now_us, top)

    @staticmethod
    def result(before: Any, changed: Any, tail: Any) -> RecordResult:
        members, evicted, expired = (int(x) for x in tail)
        added = max(0, members - int(before))
        return RecordResult(added, max(0, int(changed) - added), evicted, expired)


def _parse_load(flat: Sequence[Any]) -> dict[str, WorkerLoad]:
    req: dict[str, int] = {}
    pf: dict[str, int] = {}
    for i in range(0, len(flat) - 1, 2):
        name, value = _s(flat[i]), int(flat[i + 1])
        if name.endswith("|pf"):
            pf[name[:-3]] = value
        else:
            req[name] = value
    return {w: WorkerLoad(req.get(w, 0), pf.get(w, 0)) for w in req.keys() | pf.keys()}


class ResidencyIndex:
    """Typed access to the shared residency index, leases and engine maps in Redis.

    ``client`` is a ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster``. Every method is
    one round trip; ``run_pipeline`` sends several
    prepared calls in one.
    """

    def __init__(self, client: Any, schema: KeySchema | None = None) -> None:
        self.client = client
        self.schema = schema or KeySchema()
        self.scripts = load_scripts()
        self._encoded_args = accepts_packed_args(client)
        self._clock_offset_us: int | None = None
        self._clock_checked = 0.0

    def keys(self, model: str) -> ModelKeys:
        try:
            return self.schema.model(model)
        except KeyNameError as exc:
            raise ScriptArgumentError("model", str(exc)) from None

    # -- transport ---------------------------------------------------------------------------
    async def load(self) -> None:
        """SCRIPT LOAD every script (on a Cluster, on every primary)."""
        for name in list(self.scripts):
            try:
                await self.client.script_load(self.scripts[name].source)
            except ResponseError as exc:
                if "near '#'" not in str(exc) or not self._without_flags():
                    raise
                await self.client.script_load(self.scripts[name].source)

    def _without_flags(self) -> bool:
        """Switch to copies of the scripts without their `#!lua` flags line.

        Real Redis 7+ understands the flags; in-process stand-ins (fakeredis, used by the demo
        when no redis-server is installed) reject the line as a syntax error. Without it a
        read-only script still only reads, and a write script is still validated before its
        first write; only Redis's up-front out-of-memory refusal is lost.
        """
        if any(s.source.startswith("#!") for s in self.scripts.values()):
            log.warning("this Redis server rejects script flags: running the scripts without them")
            self.scripts = {
                name: replace(
                    s, source=s.source.split("\n", 1)[1] if s.source.startswith("#!") else s.source
                )
                for name, s in self.scripts.items()
            }
            return True
        return False

    async def _run(self, call: ScriptCall) -> Any:
        try:
            return await self._run_once(call)
        except ResponseError as exc:
            if "near '#'" in str(exc) and self._without_flags():
                return await self._run_once(replace(call, script=self.scripts[call.script.name]))
            raise

    async def _run_once(self, call: ScriptCall) -> Any:
        s = call.script
        try:
            try:
                reply = await self.client.evalsha(s.sha, s.num_keys, *call.keys, *call.args)
            except NoScriptError:
                # Script cache flushed (restart, failover, SCRIPT FLUSH): load and retry once.
                await self.client.script_load(s.source)
                reply = await self.client.evalsha(s.sha, s.num_keys, *call.keys, *call.args)
        except ResponseError as exc:
            typed = from_reply(str(exc))
            if typed is not None:
                raise typed from None
            raise
        return call.decode(reply) if call.decode else reply

    async def server_now_us(self) -> int:
        """Now on the Redis server's clock, in us: the local clock plus an offset read with
        TIME at first use and every CLOCK_REFRESH_S. Records written with it expire by the
        same clock the scripts read, whatever the router host's clock says."""
        mono = time.monotonic()
        if self._clock_offset_us is None or mono - self._clock_checked > CLOCK_REFRESH_S:
            self._clock_checked = mono  # one refresh at a time once an offset is known
            t0 = time.time()
            reply = await self.client.time()
            t1 = time.time()
            if isinstance(reply, dict):  # a Cluster answers per node: any one will do
                reply = next(iter(reply.values()))
            sec, usec = reply
            self._clock_offset_us = int(sec) * 1_000_000 + int(usec) - int((t0 + t1) * 500_000)
        return int(time.time() * 1_000_000) + self._clock_offset_us

    async def run_pipeline(
        self, calls: Sequence[ScriptCall | RecordCall], *, return_exceptions: bool = False
    ) -> list[Any]:
        """Send prepared calls in one round trip (same model, so one Cluster node).

        On one server the calls go out in order on one connection (a record is three
        commands, see ``RecordCall``). redis-py refuses EVALSHA in Cluster pipelines, so on a
        Cluster the calls go out concurrently on the node's pooled connections, each record
        as one MULTI/EXEC transaction: still one round trip of wall time. With
        ``return_exceptions`` a call that failed gives its (typed) exception in its place
        instead of raising; a lost connection still raises.
        """
        now_us = 0
        if any(isinstance(c, RecordCall) and not c.now_ms for c in calls):
            now_us = await self.server_now_us()
        if isinstance(self.client, RedisCluster):
            return list(
                await asyncio.gather(
                    *(
                        self._run(c) if isinstance(c, ScriptCall) else self._run_record(c, now_us)
                        for c in calls
                    ),
                    return_exceptions=return_exceptions,
                )
            )
        pipe = self.client.pipeline(transaction=False)
        spans: list[int] = []
        tails: list[ScriptCall | None] = []
        for c in calls:
            if isinstance(c, ScriptCall):
                pipe.evalsha(c.script.sha, c.script.num_keys, *c.keys, *c.args)
                spans.append(1)
                tails.append(None)
                continue
            span, tail = self._queue_record(pipe, c, now_us)
            spans.append(span)
            tails.append(tail)
        replies = await pipe.execute(raise_on_error=False)
        out: list[Any] = []
        at = 0
        for c, span, maybe_tail in zip(calls, spans, tails, strict=True):
            got = replies[at : at + span]
            at += span
            try:
                if maybe_tail is None:
                    assert isinstance(c, ScriptCall)
                    out.append(await self._script_reply(c, got[0]))
                else:
                    out.append(await self._record_reply(maybe_tail, got))
            except (IndexError_, ResponseError) as exc:
                if not return_exceptions:
                    raise
                out.append(exc)
        return out

    async def _script_reply(self, c: ScriptCall, r: Any) -> Any:
        """A script's decoded reply from a pipeline (NOSCRIPT: loaded and run again)."""
        if isinstance(r, NoScriptError):
            return await self._run(c)
        if isinstance(r, ResponseError) and "near '#'" in str(r):
            self._without_flags()  # a stand-in without script flags (see _without_flags)
            return await self._run(replace(c, script=self.scripts[c.script.name]))
        if isinstance(r, ResponseError):
            typed = from_reply(str(r))
            raise typed if typed is not None else r
        if isinstance(r, Exception):
            raise r
        return c.decode(r) if c.decode else r

    async def _record_reply(self, tail: ScriptCall, got: Sequence[Any]) -> RecordResult:
        """A record's result from its ZCARD, ZADD (absent for an empty chain) and script
        replies. A script cache flushed under the record (restart, failover) leaves the ZADD
        done and the script not: it is loaded and run alone to finish the record."""
        for r in got[:-1]:
            if isinstance(r, Exception):
                raise r
        last = await self._script_reply(tail, got[-1])
        return RecordCall.result(got[0], got[1] if len(got) == 3 else 0, last)

    @staticmethod
    def _queue_record(pipe: Any, c: RecordCall, now_us: int) -> tuple[int, ScriptCall]:
        """Queue a record's commands on `pipe`: how many, and the finishing script call.
        (EVALSHA through execute_command: Cluster pipelines refuse the evalsha method.)"""
        zcard, zadd, tail = c.commands(now_us)
        pipe.execute_command(*zcard)
        if zadd is not None:
            pipe.execute_command(*zadd)
        pipe.execute_command(
            "EVALSHA", tail.script.sha, tail.script.num_keys, *tail.keys, *tail.args
        )
        return (3 if zadd is not None else 2), tail

    async def _run_record(self, c: RecordCall, now_us: int) -> RecordResult:
        """A record on a Cluster: its commands as one MULTI/EXEC on the model's node."""
        pipe = self.client.pipeline(transaction=True)
        _, tail = self._queue_record(pipe, c, now_us)
        replies = await pipe.execute(raise_on_error=False)
        return await self._record_reply(tail, replies)

    # -- residency ---------------------------------------------------------------------------
    def lookup_call(
        self,
        model: str,
        chain: Sequence[int],
        candidates: Iterable[str] | None = None,
        now_ms: int = 0,
    ) -> ScriptCall:
        k = self.keys(model)
        cand = "\n".join(_worker(w) for w in candidates) if candidates is not None else ""
        packed = _pack_keys("chain", chain)

        def decode(reply: Any) -> LookupResult:
            flat, load, probes = reply
            depths = {_s(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
            return LookupResult(depths, _parse_load(load), int(probes))

        now = _nonneg("now_ms", now_ms)
        return ScriptCall(
            self.scripts["lookup_chain"],
            [k.worker_prefix, k.cut_prefix, k.load, k.head_prefix],
            [now, packed, cand],
            decode,
        )

    async def lookup(
        self,
        model: str,
        chain: Sequence[int],
        candidates: Iterable[str] | None = None,
        now_ms: int = 0,
    ) -> LookupResult:
        """Each worker's consecutive matched depth for `chain`, plus shared load."""
        result: LookupResult = await self._run(self.lookup_call(model, chain, candidates, now_ms))
        return result

    def record_call(
        self,
        model: str,
        worker: str,
        chain: Sequence[int],
        *,
        ttl_new_ms: int,
        ttl_held_ms: int = 0,
        held: int = 0,
        capacity: int = 0,
        now_ms: int = 0,
        limit: int | None = None,
    ) -> RecordCall:
        """Prepare a record of `chain` for `worker` (sent by ``run_pipeline`` or ``record``).

        The first `held` blocks live `ttl_held_ms` (0 = `ttl_new_ms`), the rest `ttl_new_ms`,
        from `now_ms` (0 = the Redis server's clock, as ``server_now_us`` tracks it); each block
        scores 1 us below its parent. The worker is then trimmed to `capacity` blocks (0 = no
        limit), at most `limit` in this call (default: twice the chain, at least 1,000, so a
        worker recorded with long chains stays at its capacity and one that shrank catches
        up). Every argument is checked here, before anything is sent.
        """
        k = self.keys(model)
        w = _worker(worker)
        return RecordCall(
            script=self.scripts["record_chain"],
            keys=[k.worker(w), k.cut(w), k.workers, k.head_prefix],
            worker=w,
            packed=_pack_keys("chain", chain),
            now_ms=_nonneg("now_ms", now_ms),
            ttl_new_us=_nonneg("ttl_new_ms", ttl_new_ms, minimum=1, maximum=MAX_TTL_MS) * 1000,
            ttl_held_us=_nonneg("ttl_held_ms", ttl_held_ms, maximum=MAX_TTL_MS) * 1000,
            held=_nonneg("held", held),
            capacity=_nonneg("capacity", capacity),
            limit=max(1000, 2 * len(chain))
            if limit is None
            else _nonneg("limit", limit, minimum=1),
            encoded=self._encoded_args,
        )

    async def record(
        self, model: str, worker: str, chain: Sequence[int], **kw: int
    ) -> RecordResult:
        """Record `worker` as holding `chain` (arguments as for ``record_call``)."""
        result: RecordResult = (
            await self.run_pipeline([self.record_call(model, worker, chain, **kw)])
        )[0]
        return result

    def evict_call(
        self,
        model: str,
        worker: str,
        keys: Sequence[int],
        *,
        mark_holes: bool = True,
        now_ms: int = 0,
    ) -> ScriptCall:
        k = self.keys(model)
        w = _worker(worker)
        return ScriptCall(
            self.scripts["evict_blocks"],
            [k.worker(w), k.cut(w)],
            [w, _pack_keys("keys", keys), _nonneg("now_ms", now_ms), 1 if mark_holes else 0],
            int,
        )

    def clear_worker_call(self, model: str, worker: str) -> ScriptCall:
        k = self.keys(model)
        w = _worker(worker)
        return ScriptCall(
            self.scripts["clear_worker"],
            [k.worker(w), k.cut(w), k.engine_map(w), k.workers, k.head_prefix],
            [w],
            int,
        )

    async def evict(
        self,
        model: str,
        worker: str,
        keys: Sequence[int],
        *,
        mark_holes: bool = True,
        now_ms: int = 0,
    ) -> int:
        """Remove blocks from a worker; returns how many records it had."""
        k = self.keys(model)
        w = _worker(worker)
        call = ScriptCall(
            self.scripts["evict_blocks"],
            [k.worker(w), k.cut(w)],
            [w, _pack_keys("keys", keys), _nonneg("now_ms", now_ms), 1 if mark_holes else 0],
        )
        return int(await self._run(call))

    async def clear_worker(self, model: str, worker: str) -> int:
        """Forget everything `worker` holds for `model`, atomically; returns records dropped."""
        result: int = await self._run(self.clear_worker_call(model, worker))
        return result

    # -- engine maps ---------------------------------------------------------------------
    async def store_engine_blocks(
        self,
        model: str,
        worker: str,
        blocks: Sequence[EngineBlock],
        *,
        ttl_ms: int,
        capacity: int = 0,
        now_ms: int = 0,
        limit: int = 1000,
    ) -> StoreResult:
        """Map engine hashes to router keys and record them as confirmed residency."""
        k = self.keys(model)
        w = _worker(worker)
        if len(blocks) > MAX_CHAIN_BLOCKS:
            raise ScriptArgumentError("blocks", f"at most {MAX_CHAIN_BLOCKS} per call")
        parts: list[str] = []
        roots: list[str] = []
        for b in blocks:
            for name, v in (("engine_hash", b.engine_hash), ("router_key", b.router_key)):
                if not isinstance(v, int) or not 0 <= v <= _U64:
                    raise ScriptArgumentError(name, "must be an unsigned 64-bit integer")
            p = b.parent_hash
            if p is not None and (not isinstance(p, int) or not 0 <= p <= _U64):
                raise ScriptArgumentError(
                    "parent_hash", "must be an unsigned 64-bit integer or None"
                )
            parts.append(key_hex(b.engine_hash) + key_hex(p or 0) + key_hex(b.router_key))
            roots.append("1" if p is None else "0")
        call = ScriptCall(
            self.scripts["store_engine_blocks"],
            [k.engine_map(w), k.worker(w), k.cut(w), k.workers, k.head_prefix],
            [
                w,
                "".join(parts),
                "".join(roots),
                _nonneg("now_ms", now_ms),
                _nonneg("ttl_ms", ttl_ms, minimum=1),
                _nonneg("capacity", capacity),
                _nonneg("limit", limit, minimum=1),
            ],
        )
        return StoreResult(*(int(x) for x in await self._run(call)))

    async def release_engine_blocks(
        self, model: str, worker: str, engine_hashes: Sequence[int], *, now_ms: int = 0
    ) -> ReleaseResult:
        """Drop one reference per engine hash; remove residency at zero."""
        k = self.keys(model)
        w = _worker(worker)
        call = ScriptCall(
            self.scripts["release_engine_blocks"],
            [k.engine_map(w), k.worker(w), k.cut(w)],
            [w, _pack_keys("engine_hashes", engine_hashes), _nonneg("now_ms", now_ms)],
        )
        return ReleaseResult(*(int(x) for x in await self._run(call)))

    def resolve_engine_blocks_call(
        self, model: str, worker: str, engine_hashes: Sequence[int]
    ) -> ScriptCall:
        k = self.keys(model)
        w = _worker(worker)
        return ScriptCall(
            self.scripts["resolve_engine_blocks"],
            [k.engine_map(w)],
            [_pack_keys("engine_hashes", engine_hashes)],
            lambda reply: [int(_s(v), 16) if v else None for v in reply],
        )

    def apply_engine_events_call(
        self,
        model: str,
        worker: str,
        ops: str,
        fields: str,
        *,
        epoch: int,
        seq: int,
        ttl_ms: int,
        capacity: int = 0,
        now_ms: int = 0,
        limit: int = 1000,
    ) -> ScriptCall:
        """One worker's engine events for one model, in order (see apply_engine_events-6.lua).

        ``ops`` is one character per op (R, S, D, C); ``fields`` the packed hex fields
        (``pack_u64``). The script validates the fields; this checks the rest.
        """
        k = self.keys(model)
        w = _worker(worker)
        if not isinstance(ops, str) or not _OPS.match(ops):
            raise ScriptArgumentError("ops", "must be characters R, S, D or C")
        if len(ops) > 4 * MAX_CHAIN_BLOCKS:
            raise ScriptArgumentError("ops", f"at most {4 * MAX_CHAIN_BLOCKS} per call")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < -1 or seq > _U64:
            raise ScriptArgumentError("seq", f"must be an integer >= -1, got {seq!r}")
        return ScriptCall(
            self.scripts["apply_engine_events"],
            [k.engine_map(w), k.worker(w), k.cut(w), k.workers, k.head_prefix, k.listener_seq],
            [
                w,
                ops,
                fields,
                _nonneg("now_ms", now_ms),
                _nonneg("ttl_ms", ttl_ms, minimum=1),
                _nonneg("capacity", capacity),
                _nonneg("limit", limit, minimum=1),
                _nonneg("epoch", epoch),
                seq,
            ],
            lambda r: ApplyResult(*(int(x) for x in r)),
        )

    def claim_worker_call(self, model: str, worker: str, *, epoch: int, ttl_ms: int) -> ScriptCall:
        """Fence older owners out of ``model`` for ``worker`` and read its stream position."""
        k = self.keys(model)
        w = _worker(worker)
        return ScriptCall(
            self.scripts["claim_worker"],
            [k.listener_seq],
            [w, _nonneg("epoch", epoch), _nonneg("ttl_ms", ttl_ms, minimum=1)],
            lambda r: ClaimResult(int(r[0]) == 1, int(r[1])),
        )

    def own_worker_call(
        self, worker: str, listener_id: str, *, release: bool = False, lease_ms: int = 1
    ) -> ScriptCall:
        """Acquire or renew (or release) the lease on applying ``worker``'s events."""
        w = _worker(worker)
        if (
            not isinstance(listener_id, str)
            or not 0 < len(listener_id) <= 256
            or any(c.isspace() for c in listener_id)
        ):
            raise ScriptArgumentError("listener", "must be 1-256 characters without whitespace")

        def decode(r: Any) -> OwnerLease:
            return OwnerLease(
                int(r[0]) == 1, int(r[1]), _s(r[2]), int(r[3]), tuple(_s(m) for m in r[4:])
            )

        return ScriptCall(
            self.scripts["own_worker"],
            [self.schema.listener_owner(w)],
            [
                listener_id,
                "release" if release else "acquire",
                _nonneg("lease_ms", lease_ms, minimum=1),
            ],
            decode,
        )

    async def call(self, call: ScriptCall) -> Any:
        """Run one prepared call (EVALSHA, NOSCRIPT reload) and decode its reply."""
        return await self._run(call)

    async def resolve_engine_blocks(
        self, model: str, worker: str, engine_hashes: Sequence[int]
    ) -> list[int | None]:
        """Router keys for engine hashes (None where unknown)."""
        k = self.keys(model)
        w = _worker(worker)
        call = ScriptCall(
            self.scripts["resolve_engine_blocks"],
            [k.engine_map(w)],
            [_pack_keys("engine_hashes", engine_hashes)],
        )
        reply = await self._run(call)
        return [int(_s(v), 16) if v else None for v in reply]

    # -- leases ------------------------------------------------------------------------------
    def acquire_lease_call(
        self,
        model: str,
        worker: str,
        lease_id: str,
        *,
        prefill_tokens: int,
        ttl_ms: int,
        now_ms: int = 0,
    ) -> ScriptCall:
        k = self.keys(model)
        w = _worker(worker)
        if not isinstance(lease_id, str) or not _LEASE_ID.match(lease_id):
            raise ScriptArgumentError("lease_id", "must be 1-64 characters of [0-9A-Za-z_-]")
        return ScriptCall(
            self.scripts["acquire_lease"],
            [k.leases, k.load],
            [
                w,
                lease_id,
                _nonneg("prefill_tokens", prefill_tokens),
                _nonneg("ttl_ms", ttl_ms, minimum=1, maximum=MAX_LEASE_TTL_MS),
                _nonneg("now_ms", now_ms),
            ],
            lambda r: WorkerLoad(int(r[0]), int(r[1])),
        )

    async def acquire_lease(self, model: str, worker: str, lease_id: str, **kw: int) -> WorkerLoad:
        """Count an in-flight request against `worker`; returns its load afterwards."""
        result: WorkerLoad = await self._run(self.acquire_lease_call(model, worker, lease_id, **kw))
        return result

    async def release_lease(
        self,
        model: str,
        worker: str,
        lease_id: str,
        *,
        prefill_tokens: int,
        prefilled_only: bool = False,
    ) -> bool:
        """Give a lease back (or only its prefill tokens once the first token arrived)."""
        k = self.keys(model)
        w = _worker(worker)
        if not isinstance(lease_id, str) or not _LEASE_ID.match(lease_id):
            raise ScriptArgumentError("lease_id", "must be 1-64 characters of [0-9A-Za-z_-]")
        call = ScriptCall(
            self.scripts["release_lease"],
            [k.leases, k.load],
            [
                w,
                lease_id,
                _nonneg("prefill_tokens", prefill_tokens),
                "prefilled" if prefilled_only else "end",
            ],
        )
        return bool(int(await self._run(call)))
