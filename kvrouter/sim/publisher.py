"""ZMQ publisher of one simulated worker's KV events, with vLLM's replay socket.

Live stream: a PUB socket sends `[topic, seq (8 bytes big-endian), payload]` per batch; seq
starts at 0 and grows by one per batch. Replay: a ROUTER socket answers a DEALER's
`[b"", start_seq]` with `[b"", seq, payload]` for every buffered batch with seq >= start,
then the end marker `[b"", b"\\xff" * 8, b""]` (the pre-#45177 framing, spec section 1.5).

Fault injection for tests of the listener: `drop_next` swallows the next batches on the
live stream (their seqs are used up, so subscribers see a gap; they stay replayable unless
asked otherwise), and `restart` starts the seq over at 0 with an empty replay buffer, as a
restarted engine does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from kvrouter.sim.events import Encoding, KVEvent, encode_batch

log = logging.getLogger(__name__)

END_MARKER_SEQ = b"\xff" * 8


def bind_tcp(sock: zmq.Socket[Any], host: str, port: int) -> str:
    """Bind to tcp://host:port (port 0 = a free port) and return the endpoint to connect to."""
    if port == 0:
        sock.bind(f"tcp://{host}:*")
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return endpoint
    sock.bind(f"tcp://{host}:{port}")
    return f"tcp://{host}:{port}"


class EventPublisher:
    """PUB + replay ROUTER for one worker. Create, `await start()`, `publish()`, `close()`."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        host: str,
        port: int,
        replay_port: int,
        encoding: Encoding,
        topic: str = "",
        buffer_steps: int = 10_000,
        dp_rank: int = 0,
    ) -> None:
        self._ctx = ctx
        self._host = host
        self._port = port
        self._replay_port = replay_port
        self.encoding: Encoding = encoding
        self._topic = topic.encode("utf-8")
        self._dp_rank = dp_rank
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._drop_remaining = 0
        self._drop_keeps_replay = True
        self._pub: zmq.Socket[bytes] | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self.endpoint = ""
        self.replay_endpoint = ""
        self.batches_sent = 0
        self.batches_dropped = 0

    @property
    def next_seq(self) -> int:
        """The seq the next batch will carry."""
        return self._seq

    async def start(self) -> None:
        """Bind both sockets and start answering replay requests."""
        # The PUB socket is used synchronously: a PUB send never blocks (it drops at the
        # high-water mark, as vLLM's does), so the engine loop need not await it.
        pub: zmq.Socket[bytes] = zmq.Context.shadow(self._ctx.underlying).socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 100_000)
        self.endpoint = bind_tcp(pub, self._host, self._port)
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        self.replay_endpoint = bind_tcp(router, self._host, self._replay_port)
        self._pub, self._router = pub, router
        self._replay_task = asyncio.create_task(self._serve_replay(), name="kv-replay")

    def publish(self, events: Sequence[KVEvent]) -> int | None:
        """Send one batch; returns its seq (None if there was nothing to send)."""
        if not events or self._pub is None:
            return None
        seq = self._seq
        self._seq += 1
        payload = encode_batch(time.time(), events, self.encoding, self._dp_rank)
        if self._drop_remaining > 0:
            self._drop_remaining -= 1
            self.batches_dropped += 1
            if self._drop_keeps_replay:
                self._buffer.append((seq, payload))
            return seq
        self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload])
        self._buffer.append((seq, payload))
        self.batches_sent += 1
        return seq

    def drop_next(self, count: int, *, keep_in_replay: bool = True) -> None:
        """Do not send the next `count` batches live (their seqs are still used up)."""
        if count < 0:
            raise ValueError("count must be >= 0")
        self._drop_remaining = count
        self._drop_keeps_replay = keep_in_replay

    def restart(self) -> None:
        """Forget the replay buffer and start the seq over at 0, like a new engine."""
        self._seq = 0
        self._buffer.clear()
        self._drop_remaining = 0

    async def close(self) -> None:
        """Stop replay and close both sockets. Idempotent."""
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._router = None

    async def _serve_replay(self) -> None:
        router = self._router
        assert router is not None
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                log.warning(
                    "invalid replay request (%d frames) on %s", len(frames), self.replay_endpoint
                )
                continue
            ident = frames[0]
            start = int.from_bytes(frames[2], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await router.send_multipart([ident, b"", seq.to_bytes(8, "big"), payload])
            await router.send_multipart([ident, b"", END_MARKER_SEQ, b""])
