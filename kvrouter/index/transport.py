"""Sending prepared script calls to Redis: EVALSHA with NOSCRIPT reload, pipelines, and the
one place that knows how servers differ.

A ``ScriptCall`` is one EVALSHA; a ``RecordCall`` is a router's record (ZCARD, a plain ZADD,
then record_chain). ``ScriptTransport`` sends either, alone or several in one round trip.
What differs between servers is decided once, in ``ServerTraits``: a Redis Cluster (EVALSHA
refused in pipelines, so calls go out concurrently and a record as MULTI/EXEC), a client that
takes pre-encoded ZADD arguments, and a server that rejects script flags (fakeredis, which
the demo uses when no redis-server is installed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from kvrouter.index.clock import ServerClock
from kvrouter.index.connection import PackedArgs, accepts_packed_args
from kvrouter.index.errors import IndexError_, from_reply
from kvrouter.index.resp import zadd_pairs
from kvrouter.index.results import RecordResult
from kvrouter.index.script_loader import LuaScript

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScriptCall:
    """One prepared EVALSHA, so several can share a pipeline (one round trip)."""

    script: LuaScript
    keys: list[str]
    args: list[str | int]
    decode: Any = field(default=None)


@dataclass(slots=True)
class RecordCall:
    """One prepared record (see ``ResidencyIndex.record_call`` and record_chain-5.lua).

    Four commands, sent in order on one connection: ZCARD of the worker's set, a plain
    ``ZADD GT CH`` of every block with its valid-until, a plain ``ZADD GT`` of every block's
    last access into the worker's lru set, and the record_chain script that finishes the
    record. Redis parses the ZADDs' thousands of arguments natively; passing them through a
    Lua script cost three times as much server time (docs/benchmarks.md).
    ``keys``: wrk, cut, workers, head prefix, lru (record_chain-5.lua's KEYS).
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

    def lru_args(self, now_us: int) -> list[Any]:
        """The ZADD of this record's last accesses: block i (from 0) at now - i, so a chain's
        tail is trimmed before its head."""
        n = self.blocks
        if self.encoded:
            data = zadd_pairs([(now_us, n)], self.packed.encode())
            if data is not None:
                return ["ZADD", self.keys[4], "GT", PackedArgs(2 * n, data)]
        p = self.packed
        flat: list[Any] = [None] * (2 * n)
        flat[0::2] = range(now_us, now_us - n, -1)
        flat[1::2] = [p[i : i + 16] for i in range(0, 16 * n, 16)]
        return ["ZADD", self.keys[4], "GT", *flat]

    def tail(self, now_us: int, top: int) -> ScriptCall:
        return ScriptCall(
            self.script,
            self.keys,
            [self.worker, self.packed, now_us, top, self.capacity, self.limit],
        )

    def commands(self, now_us: int) -> tuple[list[Any], list[list[Any]], ScriptCall]:
        """ZCARD, the ZADDs (none for an empty chain) and the finishing script call."""
        if self.now_ms:
            now_us = self.now_ms * 1000
        zcard: list[Any] = ["ZCARD", self.keys[0]]
        if not self.blocks:
            return zcard, [], self.tail(now_us, 0)
        zadd, top = self.zadd_args(now_us)
        return zcard, [zadd, self.lru_args(now_us)], self.tail(now_us, top)

    @staticmethod
    def result(before: Any, changed: Any, tail: Any) -> RecordResult:
        members, evicted, expired = (int(x) for x in tail)
        added = max(0, members - int(before))
        return RecordResult(added, max(0, int(changed) - added), evicted, expired)


@dataclass(slots=True)
class ServerTraits:
    """How this client's server differs from a single plain Redis 7: decided here only."""

    cluster: bool
    """A Redis Cluster: redis-py refuses EVALSHA in its pipelines."""
    packed_args: bool
    """The client takes a ZADD's pairs pre-encoded (``PackedArgs``)."""
    script_flags: bool = True
    """The server accepts ``#!lua flags=...`` lines; False once it rejected one (fakeredis)."""

    @classmethod
    def of(cls, client: Any) -> ServerTraits:
        return cls(
            cluster=isinstance(client, RedisCluster), packed_args=accepts_packed_args(client)
        )


def _flags_rejected(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and "near '#'" in str(exc)


class ScriptTransport:
    """Runs prepared calls on ``client`` (a ``redis.asyncio.Redis`` or ``RedisCluster``)."""

    def __init__(self, client: Any, scripts: dict[str, LuaScript]) -> None:
        self.client = client
        self.scripts = scripts
        self.traits = ServerTraits.of(client)
        self.clock = ServerClock(client)

    async def load(self) -> None:
        """SCRIPT LOAD every script (on a Cluster, on every primary)."""
        for name in list(self.scripts):
            try:
                await self.client.script_load(self.scripts[name].source)
            except ResponseError as exc:
                if not _flags_rejected(exc) or not self._without_flags():
                    raise
                await self.client.script_load(self.scripts[name].source)

    def _without_flags(self) -> bool:
        """Switch to copies of the scripts without their `#!lua` flags line; False if that
        was done already (the error has another cause).

        Real Redis 7+ understands the flags; in-process stand-ins (fakeredis, used by the demo
        when no redis-server is installed) reject the line as a syntax error. Without it a
        read-only script still only reads, and a write script is still validated before its
        first write; only Redis's up-front out-of-memory refusal is lost.
        """
        if not self.traits.script_flags:
            return False
        log.warning("this Redis server rejects script flags: running the scripts without them")
        self.traits.script_flags = False
        self.scripts = {name: s.without_flags() for name, s in self.scripts.items()}
        return True

    def _current(self, call: ScriptCall) -> ScriptCall:
        """`call` with the script as currently loaded (flags stripped if the server needs)."""
        s = self.scripts.get(call.script.name, call.script)
        if s is call.script:
            return call
        return ScriptCall(s, call.keys, call.args, call.decode)

    async def run(self, call: ScriptCall) -> Any:
        """Run one call (EVALSHA, NOSCRIPT reload) and decode its reply."""
        try:
            return await self._run_once(self._current(call))
        except ResponseError as exc:
            if _flags_rejected(exc) and self._without_flags():
                return await self._run_once(self._current(call))
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
            now_us = await self.clock.now_us()
        if self.traits.cluster:
            return list(
                await asyncio.gather(
                    *(
                        self.run(c) if isinstance(c, ScriptCall) else self._run_record(c, now_us)
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
                c = self._current(c)
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
            return await self.run(c)
        if _flags_rejected(r):
            self._without_flags()  # a stand-in without script flags (see _without_flags)
            return await self.run(c)
        if isinstance(r, ResponseError):
            typed = from_reply(str(r))
            raise typed if typed is not None else r
        if isinstance(r, Exception):
            raise r
        return c.decode(r) if c.decode else r

    async def _record_reply(self, tail: ScriptCall, got: Sequence[Any]) -> RecordResult:
        """A record's result from its ZCARD, ZADDs (absent for an empty chain) and script
        replies. A script cache flushed under the record (restart, failover) leaves the ZADD
        done and the script not: it is loaded and run alone to finish the record."""
        for r in got[:-1]:
            if isinstance(r, Exception):
                raise r
        last = await self._script_reply(tail, got[-1])
        return RecordCall.result(got[0], got[1] if len(got) == 4 else 0, last)

    def _queue_record(self, pipe: Any, c: RecordCall, now_us: int) -> tuple[int, ScriptCall]:
        """Queue a record's commands on `pipe`: how many, and the finishing script call.
        (EVALSHA through execute_command: Cluster pipelines refuse the evalsha method.)"""
        zcard, zadds, tail = c.commands(now_us)
        tail = self._current(tail)
        pipe.execute_command(*zcard)
        for zadd in zadds:
            pipe.execute_command(*zadd)
        pipe.execute_command(
            "EVALSHA", tail.script.sha, tail.script.num_keys, *tail.keys, *tail.args
        )
        return 2 + len(zadds), tail

    async def _run_record(self, c: RecordCall, now_us: int) -> RecordResult:
        """A record on a Cluster: its commands as one MULTI/EXEC on the model's node."""
        pipe = self.client.pipeline(transaction=True)
        _, tail = self._queue_record(pipe, c, now_us)
        replies = await pipe.execute(raise_on_error=False)
        return await self._record_reply(tail, replies)
