"""KV events on the wire: a real pyzmq SUB and DEALER on loopback, decoded with msgpack."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from kvrouter.sim.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    decode_batch,
    encode_batch,
)
from kvrouter.sim.fleet import SimFleet
from kvrouter.sim.settings import KvEventsMode, SimSettings
from kvrouter.sim.worker import WorkerInfo

END = b"\xff" * 8
_prompt_ids = itertools.count(1)


class Wire:
    """A fleet of one worker with a SUB on its events and an HTTP session."""

    def __init__(self, fleet: SimFleet, http: aiohttp.ClientSession) -> None:
        self.fleet = fleet
        self.http = http
        assert fleet.info is not None
        self.info: WorkerInfo = fleet.info.workers[0]
        self.ctx = zmq.asyncio.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        assert self.info.events_endpoint
        self.sub.connect(self.info.events_endpoint)

    async def complete(self, prompt: list[int], max_tokens: int = 1) -> dict[str, Any]:
        body = {"prompt": prompt, "max_tokens": max_tokens}
        async with self.http.post(self.info.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            result: dict[str, Any] = await resp.json()
            return result

    async def post(self, path: str) -> int:
        async with self.http.post(self.info.url + path) as resp:
            return resp.status

    async def recv(self, wait_s: float = 10.0) -> list[bytes]:
        frames: list[bytes] = await asyncio.wait_for(self.sub.recv_multipart(), wait_s)
        return frames

    async def first_live(self) -> tuple[list[bytes], list[int]]:
        """Send fresh 40-token prompts until the SUB has joined and sees one (slow joiner)."""
        for _ in range(200):
            prompt = fresh_prompt(40)
            await self.complete(prompt)
            try:
                return await self.recv(wait_s=0.1), prompt
            except TimeoutError:
                continue
        raise AssertionError("no live event batch arrived")

    async def replay(self, start: int) -> list[list[bytes]]:
        dealer = self.ctx.socket(zmq.DEALER)
        assert self.info.replay_endpoint
        dealer.connect(self.info.replay_endpoint)
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            out: list[list[bytes]] = []
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), 10)
                out.append(frames)
                if frames[1] == END:
                    return out
        finally:
            dealer.close(linger=0)

    def close(self) -> None:
        self.sub.close(linger=0)
        self.ctx.term()


def fresh_prompt(n: int) -> list[int]:
    base = next(_prompt_ids) * 1000
    return list(range(base, base + n))


async def make_wire(mode: KvEventsMode, capacity_tokens: int) -> AsyncIterator[Wire]:
    settings = SimSettings(
        workers=1, kv_events=mode, capacity_tokens=capacity_tokens, time_scale=200.0,
        base_port=0, kv_events_base_port=0,
    )  # fmt: skip
    async with SimFleet(settings) as fleet, aiohttp.ClientSession() as http:
        wire = Wire(fleet, http)
        try:
            yield wire
        finally:
            wire.close()


@pytest.fixture(params=["positional", "map"])
async def wire(request: pytest.FixtureRequest) -> AsyncIterator[Wire]:
    async for w in make_wire(request.param, 1 << 16):
        yield w


@pytest.fixture
async def small_wire() -> AsyncIterator[Wire]:
    async for w in make_wire("positional", 64):  # 4 blocks of 16
        yield w


async def test_live_batch_is_three_frames_in_the_chosen_encoding(wire: Wire) -> None:
    frames, prompt = await wire.first_live()
    assert len(frames) == 3
    topic, seq, payload = frames
    assert topic == b"" and len(seq) == 8
    batch = msgpack.unpackb(payload, raw=False)
    assert isinstance(batch, list) and len(batch) == 3
    ts, events, dp_rank = batch
    assert isinstance(ts, float) and dp_rank == 0
    (event,) = events
    mode = wire.fleet.settings.kv_events
    if mode == "positional":
        assert len(event) == 12
        tag, hashes, parent, token_ids, block_size, lora_id, medium, lora_name = event[:8]
        assert event[8:] == [[None, None], 0, "full_attention", None]
    else:
        assert event["type"] == "BlockStored"
        tag, hashes, parent, token_ids, block_size = (
            event["type"], event["block_hashes"], event["parent_block_hash"],
            event["token_ids"], event["block_size"],
        )  # fmt: skip
        lora_id, medium, lora_name = event["lora_id"], event["medium"], event["lora_name"]
        assert "kv_cache_spec_sliding_window" not in event  # defaults omitted in map mode
    assert tag == "BlockStored"
    assert token_ids == prompt[:32] and block_size == 16 and parent is None
    assert len(hashes) == 2 and all(0 <= h < 2**64 for h in hashes)
    assert (lora_id, medium, lora_name) == (None, "GPU", None)


async def test_seq_increments_and_replay_returns_buffered_batches(wire: Wire) -> None:
    frames, _ = await wire.first_live()
    first_seq = int.from_bytes(frames[1], "big")
    prompts = [fresh_prompt(40) for _ in range(3)]
    seqs = []
    for p in prompts:
        await wire.complete(p)
        seqs.append(int.from_bytes((await wire.recv())[1], "big"))
    assert seqs == [first_seq + 1, first_seq + 2, first_seq + 3]

    replies = await wire.replay(0)
    assert replies[-1] == [b"", END, b""]
    body = replies[:-1]
    assert [int.from_bytes(f[1], "big") for f in body] == list(range(first_seq + 4))
    assert all(len(f) == 3 and f[0] == b"" for f in body)
    _, events, _ = decode_batch(body[-1][2])
    assert isinstance(events[0], BlockStored) and events[0].token_ids == prompts[-1][:32]

    tail = await wire.replay(first_seq + 2)
    assert [int.from_bytes(f[1], "big") for f in tail[:-1]] == [first_seq + 2, first_seq + 3]


async def test_dropped_batches_leave_a_gap_that_replay_fills(wire: Wire) -> None:
    frames, _ = await wire.first_live()
    seq0 = int.from_bytes(frames[1], "big")
    assert await wire.post("/admin/drop_events?count=2") == 200
    for _ in range(3):
        await wire.complete(fresh_prompt(40))
    live = await wire.recv()
    assert int.from_bytes(live[1], "big") == seq0 + 3  # seq0+1 and seq0+2 never came live
    gap = await wire.replay(seq0 + 1)
    assert [int.from_bytes(f[1], "big") for f in gap[:-1]] == [seq0 + 1, seq0 + 2, seq0 + 3]


async def test_drop_without_replay_makes_an_unfillable_gap(wire: Wire) -> None:
    frames, _ = await wire.first_live()
    seq0 = int.from_bytes(frames[1], "big")
    assert await wire.post("/admin/drop_events?count=1&replay=0") == 200
    await wire.complete(fresh_prompt(40))
    await wire.complete(fresh_prompt(40))
    assert int.from_bytes((await wire.recv())[1], "big") == seq0 + 2
    gap = await wire.replay(seq0 + 1)
    assert [int.from_bytes(f[1], "big") for f in gap[:-1]] == [seq0 + 2]


async def test_restart_starts_seq_over_and_reset_announces_clear(wire: Wire) -> None:
    await wire.first_live()
    assert await wire.post("/admin/restart") == 200
    await wire.complete(fresh_prompt(40))
    after = await wire.recv()
    assert int.from_bytes(after[1], "big") == 0
    assert [int.from_bytes(f[1], "big") for f in (await wire.replay(0))[:-1]] == [0]
    assert await wire.post("/admin/reset_prefix_cache") == 200
    cleared = await wire.recv()
    assert int.from_bytes(cleared[1], "big") == 1
    assert decode_batch(cleared[2])[1] == [AllBlocksCleared()]


async def test_eviction_announces_block_removed_tail_first(small_wire: Wire) -> None:
    wire = small_wire
    await wire.first_live()
    assert await wire.post("/admin/reset_prefix_cache") == 200  # start from 4 empty blocks
    assert decode_batch((await wire.recv())[2])[1] == [AllBlocksCleared()]
    first = fresh_prompt(40)  # 2 full blocks + 1 partial
    await wire.complete(first)
    (stored,) = decode_batch((await wire.recv())[2])[1]
    assert isinstance(stored, BlockStored)
    # Free now: 1 never-used block, the partial one, and the 2 cached ones. A second 40-token
    # prompt needs 3: it evicts one cached block, the first prompt's tail, in the same batch
    # (one batch per step) as its own BlockStored.
    await wire.complete(fresh_prompt(40))
    _, events, _ = decode_batch((await wire.recv())[2])
    assert events[0] == BlockRemoved([stored.block_hashes[1]])
    assert isinstance(events[1], BlockStored) and len(events) == 2
    # The head survived: the first prompt still hits one block.
    again = await wire.complete(first)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 16


def test_encode_decode_round_trip_both_encodings() -> None:
    events: list[KVEvent] = [
        BlockStored([2**64 - 1, 5], 7, list(range(32)), 16),
        BlockRemoved([2**63]),
        AllBlocksCleared(),
    ]
    for mode in ("positional", "map"):
        payload = encode_batch(1.5, events, mode)
        assert decode_batch(payload) == (1.5, events, 0)
    raw = msgpack.unpackb(encode_batch(1.5, events, "positional"), raw=False)
    assert raw[1][1] == ["BlockRemoved", [2**63], "GPU", 0]
    assert raw[1][2] == ["AllBlocksCleared"]
