"""Engine KV events over ZMQ: subscribe, detect gaps and restarts, replay, yield in order.

One ``ZmqEventSource`` reads any number of engines and yields, strictly in order per worker,
``Delivered(worker_id, seq, batch)`` and ``Resync(worker_id, reason)``. A Resync means "clear
this worker: the index can no longer vouch for it"; everything delivered after it is all the
source knows about that worker. Wire format and replay protocol: ../shared/specs/kv-events.md
(1.5, 1.7).

Modes
    connect (default): one SUB per engine endpoint, connected to the engine's PUB (vLLM binds
    ``tcp://*:5557``). Frame 0 is filtered by ZMQ on the endpoint's ``topic`` prefix.
    bind (``EngineEndpoint(bind=True)``, vLLM's "centralized" mode): the listener binds one
    SUB per distinct address and engines connect to it. Engines sharing an address are told
    apart by topic: frame 0 must equal a configured ``topic`` exactly and maps to that
    endpoint's worker id (so ``kv@pod1`` never swallows ``kv@pod10``). An endpoint with topic
    ``""`` catches every topic and must then be the only one on its address. Messages whose
    topic matches nothing are counted in ``unknown_topic`` and dropped.

Workers and DP ranks
    A stream is one (endpoint, dp_rank). Its worker id is the endpoint's ``worker_id`` for
    rank 0 and ``worker_id#dpN`` for rank N > 0, with the rank taken from the batch (vLLM
    v0.9.0 batches carry none: the endpoint's ``dp_rank``, else 0). An engine with dp_size N
    publishes rank r on port P+r (replay port likewise): ``expand_dp_ranks`` turns one
    endpoint into N. An expanded endpoint pins its rank; a batch claiming another is counted
    in ``rank_mismatch`` and dropped, since its seq belongs to a different stream.

Sequence handling per stream (seq is per publisher, from 0 at every engine start)
    * next seq: delivered.
    * gap (seq jumps ahead): replay from the engine's ROUTER with a fresh DEALER, sending
      ``[b"", start 8B BE]`` and reading ``[b"", seq, payload]`` or ``[b"", topic, seq,
      payload]`` until the end marker (seq 2**64-1, empty payload). Replies stream into the
      output in order as they arrive; each wait for the engine is bounded by
      ``replay_timeout``. Where the replay cannot fill the gap (no replay endpoint, timeout,
      buffer no longer holds the start, a hole, an undecodable batch, more than
      ``max_replay_batches``), a ``Resync(reason="gap")`` is emitted at the hole and delivery
      continues with whatever follows it contiguously, then the live batch.
    * seq at or below the highest live seq seen: the engine restarted. ``Resync("restart")``,
      then recover the new incarnation from seq 0 as below.
    * seq at or below the last delivered seq but above the highest live one: a live copy of a
      batch a replay already delivered; dropped and counted in ``duplicates``.
    * first message from a stream the source has no resume point for: the index may hold
      anything from before this process started, so the source emits
      ``Resync("first_contact")`` and then asks the replay buffer for everything from seq 0.
      If the engine's buffer still holds its whole history, the index is rebuilt exactly;
      otherwise it gets the buffered tail (true, if incomplete: blocks stored before the
      tail are missing, which under-reports and is never wrong). This costs a clear per
      worker at every listener start. To avoid it, the applier can persist the last seq it
      applied per worker atomically with its writes and pass it back through ``resume=``
      (or ``set_resume``): the stream then continues from there, replaying any gap.
    A Resync is not repeated while nothing has been delivered since the previous one.
    An undecodable payload is counted and skipped without touching the stream state, so
    the next batch shows a gap; its replay hits the same bad payload and ends in a Resync.
    Limitation: an engine that restarts and publishes past the old seq before the source
    sees any message of the new incarnation is indistinguishable from a gap (ZMQ gives no
    incarnation id); SUB sockets reconnect within ``reconnect_ivl_max`` and engines load a
    model before publishing, so in practice seq 0 or a small seq is seen.

Memory is bounded: the output holds at most ``queue_size`` items (readers wait when it is
full, and the engine's PUB high-water mark then drops, which shows up as a gap), each DEALER
buffers at most ``max_replay_batches`` replies, SUB sockets at most ``rcvhwm`` messages, and
every frame at most ``MAX_PAYLOAD_BYTES`` (larger ones make ZMQ drop the connection).
One reader task per SUB socket: a replay pauses only the engines on that socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import zmq
import zmq.asyncio

from eviction_listener.batch_queue import BatchQueue
from eviction_listener.events import (
    MAX_PAYLOAD_BYTES,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventDecodeError,
    decode_batch,
)

logger = logging.getLogger(__name__)

END_SEQ: Final = 0xFFFF_FFFF_FFFF_FFFF
"""Replay end marker's seq (vLLM sends -1 as signed 8 bytes)."""

RESYNC_FIRST_CONTACT: Final = "first_contact"
RESYNC_GAP: Final = "gap"
RESYNC_RESTART: Final = "restart"
RESYNC_REASONS: Final = (RESYNC_FIRST_CONTACT, RESYNC_GAP, RESYNC_RESTART)
"""Every ``Resync.reason``: stable metric label values."""


@dataclass(frozen=True, slots=True)
class EngineEndpoint:
    """One engine publisher as the router knows it.

    ``endpoint`` is the engine's PUB address to connect to, or with ``bind=True`` the local
    address the listener binds for engines to connect to. ``replay_endpoint`` is the engine's
    ROUTER address (None: gaps cannot be filled). ``dp_rank`` pins the rank this endpoint
    serves (set by ``expand_dp_ranks``); None accepts whatever rank the batches carry.
    """

    worker_id: str
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    dp_rank: int | None = None
    bind: bool = False

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must be a non-empty string")
        if not self.endpoint:
            raise ValueError(f"{self.worker_id}: endpoint must be a non-empty string")
        if self.dp_rank is not None and self.dp_rank < 0:
            raise ValueError(f"{self.worker_id}: dp_rank must be >= 0, got {self.dp_rank}")


def dp_worker_id(worker_id: str, dp_rank: int) -> str:
    """The router's id of one DP rank of an engine: bare for rank 0, ``#dpN`` suffix above."""
    return worker_id if dp_rank == 0 else f"{worker_id}#dp{dp_rank}"


def offset_endpoint(endpoint: str, dp_rank: int) -> str:
    """The address DP rank ``dp_rank`` uses, as vLLM derives it from the configured one.

    tcp: port + rank; inproc: ``_dp{rank}`` suffix; any other scheme only for rank 0.
    """
    if dp_rank < 0:
        raise ValueError(f"dp_rank must be >= 0, got {dp_rank}")
    if dp_rank == 0:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{dp_rank}"
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint.rpartition(":")
        if not sep or not port.isdigit() or host == "tcp:/":
            raise ValueError(f"tcp endpoint without a port: {endpoint!r}")
        new_port = int(port) + dp_rank
        if new_port > 65535:
            raise ValueError(f"{endpoint!r} offset by rank {dp_rank} exceeds port 65535")
        return f"{host}:{new_port}"
    raise ValueError(f"cannot offset {endpoint!r} for DP rank {dp_rank}: only tcp and inproc")


def expand_dp_ranks(
    ep: EngineEndpoint, dp_size: int, *, first_rank: int = 0
) -> list[EngineEndpoint]:
    """One endpoint per DP rank ``first_rank .. first_rank + dp_size - 1``, ports offset."""
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    return [
        replace(
            ep,
            endpoint=offset_endpoint(ep.endpoint, rank),
            replay_endpoint=(
                None if ep.replay_endpoint is None else offset_endpoint(ep.replay_endpoint, rank)
            ),
            dp_rank=rank,
        )
        for rank in range(first_rank, first_rank + dp_size)
    ]


@dataclass(frozen=True, slots=True)
class Delivered:
    """A batch to apply, in seq order for its worker."""

    worker_id: str
    seq: int
    batch: EventBatch
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Resync:
    """Clear ``worker_id``: what the index holds for it can no longer be vouched for."""

    worker_id: str
    reason: str


SourceItem = Delivered | Resync


@dataclass(slots=True)
class SourceStats:
    """Monotonic counters for metrics; read them, do not write them."""

    messages: int = 0
    """Multipart messages received on SUB sockets."""
    bad_frames: int = 0
    """Messages that are not [topic, 8-byte seq, payload]; also bad replay replies."""
    unknown_topic: int = 0
    rank_mismatch: int = 0
    decode_errors: Counter[str] = field(default_factory=Counter)
    """By ``EventDecodeError.kind``, live and replayed payloads."""
    batches: int = 0
    """Delivered batches, live and replayed."""
    replayed_batches: int = 0
    events: int = 0
    skipped_events: int = 0
    """Events with unknown tags inside delivered batches."""
    blocks_stored: int = 0
    blocks_removed: int = 0
    cleared: int = 0
    """AllBlocksCleared events delivered."""
    duplicates: int = 0
    gaps: int = 0
    replays_ok: int = 0
    replays_failed: int = 0
    restarts: int = 0
    resyncs: Counter[str] = field(default_factory=Counter)
    """By ``Resync.reason``."""


_STAT_COUNTS: Final = (
    "messages",
    "bad_frames",
    "unknown_topic",
    "rank_mismatch",
    "batches",
    "replayed_batches",
    "events",
    "skipped_events",
    "blocks_stored",
    "blocks_removed",
    "cleared",
    "duplicates",
    "gaps",
    "replays_ok",
    "replays_failed",
    "restarts",
)


def add_stats(into: SourceStats, other: SourceStats) -> SourceStats:
    """Add ``other``'s counters into ``into`` (totals over several sources); returns ``into``."""
    for name in _STAT_COUNTS:
        setattr(into, name, getattr(into, name) + getattr(other, name))
    into.decode_errors.update(other.decode_errors)
    into.resyncs.update(other.resyncs)
    return into


class SourceFailedError(RuntimeError):
    """A reader task died on an unexpected error; the source stops yielding."""


def _reader_failed(exc: BaseException) -> SourceFailedError:
    return SourceFailedError("a ZMQ reader task failed")


@dataclass(slots=True)
class _Stream:
    worker_id: str
    endpoint: EngineEndpoint
    dp_rank: int
    last: int | None
    """Last delivered seq; None before the first delivery (or after a restart)."""
    live_high: int | None
    """Highest seq received live on the SUB socket."""
    clean: bool = False
    """Nothing delivered since the last Resync."""


@dataclass(slots=True)
class _SocketGroup:
    address: str
    bind: bool
    by_topic: dict[bytes, EngineEndpoint]
    catch_all: EngineEndpoint | None

    def resolve(self, topic: bytes) -> EngineEndpoint | None:
        ep = self.by_topic.get(topic) if self.bind else None
        return ep if ep is not None else self.catch_all

    def subscriptions(self) -> list[bytes]:
        if self.catch_all is not None:
            return [self.catch_all.topic.encode()]
        return list(self.by_topic)


class LogLimiter:
    """At most one warning per key per interval, reporting how many were suppressed."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] += 1
            return
        self._next[key] = now + self._interval
        n = self._suppressed.pop(key, 0)
        if n:
            logger.warning(msg + " (%d similar suppressed)", *args, n)
        else:
            logger.warning(msg, *args)


def _parse_replay_reply(frames: Sequence[bytes]) -> tuple[int, bytes] | None:
    # [b"", seq, payload] before vllm#45177, [b"", topic, seq, payload] after.
    if not frames or frames[0] != b"":
        return None
    if len(frames) == 3:
        seq_b, payload = frames[1], frames[2]
    elif len(frames) == 4:
        seq_b, payload = frames[2], frames[3]
    else:
        return None
    if len(seq_b) != 8:
        return None
    return int.from_bytes(seq_b, "big"), payload


def _socket_groups(endpoints: Sequence[EngineEndpoint]) -> list[_SocketGroup]:
    """Group endpoints into SUB sockets, rejecting configurations that would mix streams."""
    if not endpoints:
        raise ValueError("no engine endpoints configured")
    ranks: dict[str, list[int | None]] = {}
    for ep in endpoints:
        ranks.setdefault(ep.worker_id, []).append(ep.dp_rank)
    for wid, rs in ranks.items():
        if len(rs) > 1 and (None in rs or len(set(rs)) != len(rs)):
            raise ValueError(
                f"worker {wid!r} configured more than once without distinct dp_rank values"
            )
    groups: dict[str, _SocketGroup] = {}
    for ep in endpoints:
        g = groups.get(ep.endpoint)
        if g is not None and (not ep.bind or not g.bind):
            raise ValueError(f"address {ep.endpoint!r} configured twice (connect mode)")
        if g is None:
            g = groups[ep.endpoint] = _SocketGroup(ep.endpoint, ep.bind, {}, None)
        if not ep.bind:
            g.catch_all = ep
            continue
        topic = ep.topic.encode()
        if topic in g.by_topic or (g.catch_all is not None) or (not topic and g.by_topic):
            raise ValueError(
                f"bind address {ep.endpoint!r}: topic {ep.topic!r} is not unique "
                "(an empty topic must be alone on its address)"
            )
        if topic:
            g.by_topic[topic] = ep
        else:
            g.catch_all = ep
    return list(groups.values())


class ZmqEventSource:
    """Reads engine KV events and yields ``Delivered`` / ``Resync`` items, ordered per worker.

    Use as ``async with ZmqEventSource(endpoints) as src: async for item in src: ...`` or
    with ``get_many`` to take items in batches. ``close()`` stops reading; items already
    queued are still yielded, then iteration ends.
    """

    def __init__(
        self,
        endpoints: Iterable[EngineEndpoint],
        *,
        resume: Mapping[str, int] | None = None,
        replay_timeout: float = 2.0,
        max_replay_batches: int = 10_000,
        queue_size: int = 1024,
        rcvhwm: int = 100_000,
        reconnect_ivl_max_ms: int = 5_000,
        context: zmq.asyncio.Context | None = None,
        log_interval: float = 10.0,
    ) -> None:
        """``resume``: worker id -> last seq the index already reflects (see module doc).

        ``replay_timeout`` bounds each wait for a replay reply (seconds);
        ``max_replay_batches`` bounds one replay; ``queue_size`` bounds the output.
        """
        self._endpoints = list(endpoints)
        self._groups = _socket_groups(self._endpoints)
        if replay_timeout <= 0 or max_replay_batches < 1 or queue_size < 1 or rcvhwm < 1:
            raise ValueError("replay_timeout, max_replay_batches, queue_size, rcvhwm must be > 0")
        self._resume: dict[str, int] = dict(resume or {})
        self._replay_timeout_ms = max(1, int(replay_timeout * 1000))
        self._max_replay = max_replay_batches
        self._rcvhwm = rcvhwm
        self._reconnect_ivl_max_ms = reconnect_ivl_max_ms
        self._own_context = context is None
        self._ctx_arg = context
        self._ctx: zmq.asyncio.Context | None = None
        self._sockets: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._streams: dict[str, _Stream] = {}
        self._channel: BatchQueue[SourceItem] | None = None
        self._queue_size = queue_size
        self._log = LogLimiter(log_interval)
        self._started = False
        self._closed = False
        self.stats = SourceStats()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Create, bind or connect the SUB sockets and start reading. Idempotent."""
        if self._closed:
            raise RuntimeError("source is closed")
        if self._started:
            return
        self._started = True
        self._channel = BatchQueue(self._queue_size, on_failure=_reader_failed)
        self._ctx = self._ctx_arg if self._ctx_arg is not None else zmq.asyncio.Context()
        try:
            for group in self._groups:
                sock = self._ctx.socket(zmq.SUB)
                self._sockets.append(sock)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
                sock.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD_BYTES)
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, self._reconnect_ivl_max_ms)
                for topic in group.subscriptions():
                    sock.setsockopt(zmq.SUBSCRIBE, topic)
                if group.bind:
                    sock.bind(group.address)
                else:
                    sock.connect(group.address)
        except BaseException:
            await self.close()
            raise
        for group, sock in zip(self._groups, self._sockets, strict=True):
            self._tasks.append(
                asyncio.create_task(self._read(group, sock), name=f"kv-events {group.address}")
            )

    async def close(self) -> None:
        """Stop reading, close every socket (and the context if this source created it)."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        try:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            # Even when the caller is cancelled here (a listener closing while it drops this
            # source): a socket left open makes the context's term() wait forever.
            for sock in self._sockets:
                sock.close(linger=0)
            if self._own_context and self._ctx is not None:
                self._ctx.destroy(linger=0)  # a replay socket still open is closed too
            if self._channel is not None:
                self._channel.close()

    async def __aenter__(self) -> ZmqEventSource:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- consumer side -----------------------------------------------------------------------

    def __aiter__(self) -> ZmqEventSource:
        return self

    async def __anext__(self) -> SourceItem:
        items = await self.get_many(1)
        if not items:
            raise StopAsyncIteration
        return items[0]

    async def get_many(self, max_items: int = 256) -> list[SourceItem]:
        """Wait for at least one item, return up to ``max_items``; [] once closed and drained.

        Raises ``SourceFailedError`` once a reader task has died on an unexpected error (a
        bug, not bad input); the caller should close the source and restart from its resume
        points.
        """
        if self._channel is None:
            raise RuntimeError("source not started")
        return await self._channel.get_many(max_items)

    @property
    def pending(self) -> int:
        """Items queued for the consumer (at most ``queue_size``): an export for lag metrics."""
        return 0 if self._channel is None else len(self._channel)

    def set_resume(self, worker_id: str, last_seq: int) -> None:
        """Declare that the index reflects ``worker_id`` through ``last_seq``.

        Takes effect if the source has not yet seen that worker.
        """
        self._resume[worker_id] = last_seq

    def last_seq(self, worker_id: str) -> int | None:
        """Last seq delivered for a worker, None if none since start or its last restart."""
        st = self._streams.get(worker_id)
        return None if st is None else st.last

    # -- reader side -------------------------------------------------------------------------

    async def _read(self, group: _SocketGroup, sock: zmq.asyncio.Socket) -> None:
        try:
            while True:
                frames = await sock.recv_multipart()
                await self._on_message(group, frames)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("ZMQ reader for %s failed", group.address)
            assert self._channel is not None
            self._channel.fail(exc)

    async def _on_message(self, group: _SocketGroup, frames: list[bytes]) -> None:
        stats = self.stats
        stats.messages += 1
        if len(frames) != 3 or len(frames[1]) != 8:
            stats.bad_frames += 1
            self._log.warning(
                "bad_frames",
                "KV event message from %s is not [topic, seq, payload]: %d frames",
                group.address,
                len(frames),
            )
            return
        topic, seq_b, payload = frames
        ep = group.resolve(topic)
        if ep is None:
            stats.unknown_topic += 1
            self._log.warning(
                "unknown_topic", "KV events on %s with unknown topic %r", group.address, topic
            )
            return
        batch = self._decode(ep, payload)
        if batch is None:
            return
        st = self._stream(ep, batch)
        if st is None:
            return
        await self._on_live(st, int.from_bytes(seq_b, "big"), batch)

    def _decode(self, ep: EngineEndpoint, payload: bytes) -> EventBatch | None:
        try:
            return decode_batch(payload)
        except EventDecodeError as exc:
            self.stats.decode_errors[exc.kind] += 1
            self._log.warning(
                f"decode:{exc.kind}", "undecodable KV event batch from %s: %s", ep.worker_id, exc
            )
            return None

    def _stream(self, ep: EngineEndpoint, batch: EventBatch) -> _Stream | None:
        rank = batch.dp_rank if batch.dp_rank is not None else (ep.dp_rank or 0)
        if ep.dp_rank is not None and rank != ep.dp_rank:
            self.stats.rank_mismatch += 1
            self._log.warning(
                "rank_mismatch",
                "%s (%s) is configured as DP rank %d but sent rank %d",
                ep.worker_id,
                ep.endpoint,
                ep.dp_rank,
                rank,
            )
            return None
        wid = dp_worker_id(ep.worker_id, rank)
        st = self._streams.get(wid)
        if st is None:
            resumed = self._resume.get(wid)
            # A resume point is as good as having seen that seq live: anything at or below it
            # arriving now can only come from a restarted engine.
            st = self._streams[wid] = _Stream(wid, ep, rank, resumed, resumed)
        return st

    async def _on_live(self, st: _Stream, seq: int, batch: EventBatch) -> None:
        if st.live_high is None:
            await self._resync(st, RESYNC_FIRST_CONTACT)
            st.live_high = seq
            await self._from_zero(st, seq, batch)
            return
        if seq <= st.live_high:
            self.stats.restarts += 1
            await self._resync(st, RESYNC_RESTART)
            st.last = None
            st.live_high = seq
            await self._from_zero(st, seq, batch)
            return
        st.live_high = seq
        last = -1 if st.last is None else st.last
        if seq <= last:
            self.stats.duplicates += 1
            return
        if seq == last + 1:
            await self._deliver(st, seq, batch, replayed=False)
            return
        self.stats.gaps += 1
        await self._recover(st, last + 1, seq, batch)

    async def _from_zero(self, st: _Stream, seq: int, batch: EventBatch) -> None:
        if seq == 0:
            await self._deliver(st, seq, batch, replayed=False)
        else:
            await self._recover(st, 0, seq, batch)

    async def _recover(self, st: _Stream, start: int, seq: int, batch: EventBatch) -> None:
        """Deliver seqs ``start .. seq`` in order, from the engine's replay buffer if it can."""
        expected = start
        complete = False
        if st.endpoint.replay_endpoint is not None:
            expected, complete = await self._replay(st, start)
            if complete and expected > seq:
                self.stats.replays_ok += 1
            else:
                self.stats.replays_failed += 1
        if expected <= seq:
            if expected != seq:
                await self._resync(st, RESYNC_GAP)
            await self._deliver(st, seq, batch, replayed=False)

    async def _replay(self, st: _Stream, start: int) -> tuple[int, bool]:
        """Stream the replay from ``start`` into the output.

        Returns the next seq still needed and whether it ran without a hole to its end marker.
        """
        assert self._ctx is not None and st.endpoint.replay_endpoint is not None
        expected = start
        complete = True
        dealer = self._ctx.socket(zmq.DEALER)
        try:
            dealer.setsockopt(zmq.LINGER, 0)
            # A fresh socket per request: replies to an earlier, timed-out request can never
            # be mistaken for this one's. The HWM bounds what ZMQ buffers while we deliver.
            dealer.setsockopt(zmq.RCVHWM, self._max_replay + 1)
            dealer.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD_BYTES)
            dealer.connect(st.endpoint.replay_endpoint)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            received = 0
            while True:
                if not await dealer.poll(self._replay_timeout_ms):
                    self._log.warning(
                        "replay_timeout", "replay from %s timed out", st.endpoint.replay_endpoint
                    )
                    return expected, False
                reply = _parse_replay_reply(await dealer.recv_multipart())
                if reply is None:
                    self.stats.bad_frames += 1
                    return expected, False
                rseq, payload = reply
                if rseq == END_SEQ and not payload:
                    return expected, complete
                received += 1
                if received > self._max_replay:
                    return expected, False
                if rseq < expected:
                    continue
                if rseq != expected:
                    complete = False
                    await self._resync(st, RESYNC_GAP)
                replayed = self._decode(st.endpoint, payload)
                if replayed is None:
                    complete = False
                    continue
                if replayed.dp_rank is not None and replayed.dp_rank != st.dp_rank:
                    self.stats.rank_mismatch += 1
                    complete = False
                    continue
                await self._deliver(st, rseq, replayed, replayed=True)
                expected = rseq + 1
        finally:
            dealer.close(linger=0)

    async def _resync(self, st: _Stream, reason: str) -> None:
        if st.clean:
            return
        st.clean = True
        self.stats.resyncs[reason] += 1
        if reason == RESYNC_FIRST_CONTACT:  # once per worker per process: expected at start
            logger.info("first contact with %s: clearing it before replaying", st.worker_id)
        else:
            self._log.warning(f"resync:{reason}", "clearing worker %s (%s)", st.worker_id, reason)
        assert self._channel is not None
        await self._channel.put(Resync(st.worker_id, reason))

    async def _deliver(self, st: _Stream, seq: int, batch: EventBatch, *, replayed: bool) -> None:
        stats = self.stats
        stats.batches += 1
        if replayed:
            stats.replayed_batches += 1
        stats.events += len(batch.events)
        stats.skipped_events += batch.skipped
        for ev in batch.events:
            if type(ev) is BlockStored:
                stats.blocks_stored += len(ev.block_hashes)
            elif type(ev) is BlockRemoved:
                stats.blocks_removed += len(ev.block_hashes)
            elif type(ev) is AllBlocksCleared:
                stats.cleared += 1
        st.last = seq
        st.clean = False
        assert self._channel is not None
        await self._channel.put(Delivered(st.worker_id, seq, batch, replayed))
