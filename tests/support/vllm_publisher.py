"""A KV-event publisher that speaks vLLM's exact wire format, for the tests: real pyzmq PUB +
ROUTER sockets, per-rank port offsets, a replay ring buffer, and knobs to lose messages, skip
seqs, restart, and send malformed frames; plus helpers that wait for a listener to apply
what was published. Payloads come from kvrouter/bench/vllm_wire.py.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from array import array
from collections import deque
from collections.abc import Sequence
from typing import Any

import zmq

from eviction_listener.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
)
from eviction_listener.zmq_source import (
    END_SEQ,
    Delivered,
    SourceItem,
    ZmqEventSource,
    dp_worker_id,
    offset_endpoint,
)
from kvrouter.bench.vllm_wire import (
    FIELDS_2026,
    Encoding,
    Envelope,
    HashFormat,
    encode_batch,
)


def free_tcp_port(count: int = 1, host: str = "127.0.0.1") -> int:
    """A base port P with P .. P+count-1 free right now on ``host`` (best effort: another
    process may take one before it is bound)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            base = int(s.getsockname()[1])
        if base + count > 65535:
            continue
        probes: list[socket.socket] = []
        try:
            for p in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"no run of {count} free ports found")


def _binds(endpoint: str) -> bool:
    # vLLM's heuristic (spec 1.5): a wildcard or a local transport binds, anything else dials.
    return (
        "*" in endpoint
        or "::" in endpoint
        or endpoint.startswith("ipc://")
        or endpoint.startswith("inproc://")
    )


class VllmEventPublisher:
    """One engine's (one DP rank's) KV event publisher, on real ZMQ sockets.

    ``endpoint`` / ``replay_endpoint`` are the configured base addresses; like vLLM, rank r
    uses them offset by r. ``bind`` None applies vLLM's bind-or-connect heuristic.
    ``replay_topic_frame`` selects the replay reply format after vllm#45177 (True) or before.
    Publish methods are called from one thread; a background thread serves replay requests.
    """

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        *,
        encoding: Encoding = "positional",
        hash_format: HashFormat = "u64",
        fields: int = FIELDS_2026,
        envelope: Envelope = "array",
        dp_rank: int = 0,
        buffer_steps: int = 10_000,
        topic: str = "",
        bind: bool | None = None,
        replay_topic_frame: bool = True,
        hwm: int = 100_000,
    ) -> None:
        self.endpoint = offset_endpoint(endpoint, dp_rank)
        self.replay_endpoint = (
            None if replay_endpoint is None else offset_endpoint(replay_endpoint, dp_rank)
        )
        self.encoding: Encoding = encoding
        self.hash_format: HashFormat = hash_format
        self.fields = fields
        self.envelope: Envelope = envelope
        self.dp_rank = dp_rank
        self.topic = topic.encode()
        self.replay_topic_frame = replay_topic_frame
        self.replay_responds = True
        """Set False to make the replay socket swallow requests (the listener times out)."""
        self._next_seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._replay_requests = 0
        self._ctx = zmq.Context()
        try:
            self._pub = self._ctx.socket(zmq.PUB)
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.setsockopt(zmq.SNDHWM, hwm)
            if _binds(self.endpoint) if bind is None else bind:
                self._pub.bind(self.endpoint)
            else:
                self._pub.connect(self.endpoint)
            if self.replay_endpoint is not None:
                router = self._ctx.socket(zmq.ROUTER)
                router.setsockopt(zmq.LINGER, 0)
                router.bind(self.replay_endpoint)
                self._thread = threading.Thread(
                    target=self._serve_replay, args=(router,), name="vllm-replay", daemon=True
                )
                self._thread.start()
        except BaseException:
            # A port already taken must not leak the context (and its I/O thread).
            self._ctx.destroy(linger=0)
            raise

    @property
    def last_seq(self) -> int:
        """Seq of the most recent batch (published or lost); -1 before the first."""
        return self._next_seq - 1

    @property
    def replay_requests(self) -> int:
        """Well-formed replay requests received so far."""
        with self._lock:
            return self._replay_requests

    def publish(
        self, events: Sequence[KVEvent], *, lost: bool = False, ts: float | None = None
    ) -> int:
        """Publish one batch; ``lost=True`` keeps it in the replay buffer but never sends it
        (a message dropped on the wire). Returns its seq."""
        payload = encode_batch(
            events,
            ts=ts,
            dp_rank=self.dp_rank,
            encoding=self.encoding,
            hash_format=self.hash_format,
            fields=self.fields,
            envelope=self.envelope,
        )
        return self.publish_payload(payload, lost=lost)

    def publish_payload(self, payload: bytes, *, lost: bool = False) -> int:
        """Publish arbitrary payload bytes (possibly malformed) under the next seq."""
        seq = self._next_seq
        self._next_seq += 1
        if not lost:
            self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        with self._lock:
            self._buffer.append((seq, payload))
        return seq

    def stored(
        self,
        block_hashes: Sequence[int],
        token_ids: Sequence[int] | None = None,
        *,
        parent: int | None = None,
        block_size: int = 16,
        medium: str | None = "GPU",
        lora_name: str | None = None,
        lost: bool = False,
    ) -> int:
        """A BlockStored batch; without ``token_ids`` the tokens are synthesized from the
        hashes (deterministic, the right count)."""
        if token_ids is None:
            token_ids = [(h + i) % 100_000 for h in block_hashes for i in range(block_size)]
        ev = BlockStored(
            tuple(block_hashes),
            parent,
            array("I", token_ids),
            block_size,
            lora_name=lora_name,
            medium=medium,
        )
        return self.publish([ev], lost=lost)

    def removed(
        self, block_hashes: Sequence[int], *, medium: str | None = "GPU", lost: bool = False
    ) -> int:
        """A BlockRemoved batch."""
        return self.publish([BlockRemoved(tuple(block_hashes), medium)], lost=lost)

    def cleared(self, *, lost: bool = False) -> int:
        """An AllBlocksCleared batch."""
        return self.publish([AllBlocksCleared()], lost=lost)

    def send_frames(self, frames: Sequence[bytes]) -> None:
        """Send raw frames on the PUB socket (malformed messages); no seq is used."""
        self._pub.send_multipart(list(frames))

    def skip(self, n: int) -> None:
        """Advance seq by ``n`` without sending or buffering anything (an unfillable gap)."""
        self._next_seq += n

    def restart(self) -> None:
        """What a listener sees when the engine restarts: seq back to 0, replay buffer empty.

        Sockets stay up, so subscribers need no new handshake.
        """
        self._next_seq = 0
        with self._lock:
            self._buffer.clear()

    def close(self) -> None:
        """Stop the replay thread and close sockets and context. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pub.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> VllmEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve_replay(self, router: zmq.Socket[bytes]) -> None:
        try:
            while not self._stop.is_set():
                if not router.poll(50):
                    continue
                frames = router.recv_multipart()
                if len(frames) != 3:
                    continue  # vLLM logs "Invalid replay request" and ignores it
                identity, _, start_b = frames
                start = int.from_bytes(start_b, "big")
                with self._lock:
                    self._replay_requests += 1
                    snapshot = [(s, p) for s, p in self._buffer if s >= start]
                if not self.replay_responds:
                    continue
                topic = [self.topic] if self.replay_topic_frame else []
                for seq, payload in snapshot:
                    router.send_multipart([identity, b"", *topic, seq.to_bytes(8, "big"), payload])
                end_topic = [b""] if self.replay_topic_frame else []
                router.send_multipart([identity, b"", *end_topic, END_SEQ.to_bytes(8, "big"), b""])
        finally:
            router.close(linger=0)


async def handshake(
    pub: VllmEventPublisher, source: ZmqEventSource, worker_id: str, *, max_wait: float = 10.0
) -> list[SourceItem]:
    """Get past ZMQ's slow-joiner window: publish AllBlocksCleared batches until the source
    delivers one, then drain until the publisher's latest seq has been delivered.

    A SUB only receives what a PUB sends after the subscription has propagated, so a test
    that publishes once and waits can lose its first message; this replaces blind sleeps.
    ``worker_id`` is the endpoint's id (the rank suffix is added here). Returns every item
    consumed meanwhile, for any worker. Raises TimeoutError after ``max_wait`` seconds.
    """
    wid = dp_worker_id(worker_id, pub.dp_rank)
    items: list[SourceItem] = []
    async with asyncio.timeout(max_wait):
        # Until something arrives for this worker, its subscription may not be in place yet.
        while not any(i.worker_id == wid for i in items):
            pub.cleared()
            try:
                items += await asyncio.wait_for(source.get_many(1000), 0.05)
            except TimeoutError:
                continue
        target = pub.last_seq
        while not any(
            isinstance(i, Delivered) and i.worker_id == wid and i.seq >= target for i in items
        ):
            items += await source.get_many(1000)
    return items


async def applied_seq(client: Any, model: str, worker: str, *, prefix: str = "kvr") -> int | None:
    """The engine batch seq the index reflects for ``worker`` in ``model`` (None: nothing)."""
    from kvrouter.index.keys import KeySchema

    raw = await client.hget(KeySchema(prefix).model(model).listener_seq, worker)
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return int(text.split(":")[1])


async def wait_applied(
    client: Any,
    model: str,
    worker: str,
    seq: int,
    *,
    prefix: str = "kvr",
    max_wait: float = 15.0,
) -> None:
    """Wait (bounded, polling) until the listener applied ``worker``'s batch ``seq``.

    The deadline is checked between commands, never by cancelling one in flight: a Redis
    command cancelled mid-reply can leave a pooled connection unusable.
    """
    deadline = time.monotonic() + max_wait
    while await applied_seq(client, model, worker, prefix=prefix) != seq:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{worker} did not reach seq {seq} within {max_wait} s")
        await asyncio.sleep(0.01)


async def sync_listener(
    pub: VllmEventPublisher,
    client: Any,
    model: str,
    worker: str,
    *,
    prefix: str = "kvr",
    max_wait: float = 15.0,
) -> None:
    """Get a listener past ZMQ's slow-joiner window: publish harmless batches (the removal
    of a block hash nobody stored) until one is applied to the index. ``worker`` is the
    router's id (``ID#dpN`` for rank N)."""
    deadline = time.monotonic() + max_wait
    while True:
        seq = pub.removed([0])
        try:
            await wait_applied(client, model, worker, seq, prefix=prefix, max_wait=0.3)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
