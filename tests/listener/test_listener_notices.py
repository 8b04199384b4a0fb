"""Worker notices: the versioned msgpack schema (round trips, hostile input fuzzed with
hypothesis), and notices published with the helper reaching the index through a listener."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eviction_listener.notices import (
    NOTICE_ERROR_KINDS,
    NoticeDecodeError,
    decode_notice,
    encode_notice,
    publish_notice,
)
from eviction_listener.service import Listener
from eviction_listener.settings import ListenerSettings
from kvrouter.index.hashing import BlockHasher
from kvrouter.index.scripts import ResidencyIndex

M = "llama-test"
B = 16
u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)


@given(
    op=st.sampled_from(["store", "evict", "clear"]),
    worker=st.from_regex(r"[a-z0-9:.#-]{1,20}", fullmatch=True),
    keys=st.lists(u64, max_size=50),
    lora=st.none() | st.text(min_size=1, max_size=10),
    from_block=st.integers(0, 100),
)
def test_round_trip(
    op: Any, worker: str, keys: list[int], lora: str | None, from_block: int
) -> None:
    kw: dict[str, Any] = {} if op == "clear" else {"keys": keys}
    n = decode_notice(
        encode_notice(op, worker, lora_name=lora, from_block=from_block, ts=1.5, **kw)
    )
    assert (n.op, n.worker, n.lora_name, n.from_block, n.ts) == (op, worker, lora, from_block, 1.5)
    assert n.keys == (None if op == "clear" else tuple(keys))


@given(tokens=st.lists(u32, max_size=100), salt=st.none() | st.text(min_size=1, max_size=5))
def test_tokens_round_trip(tokens: list[int], salt: str | None) -> None:
    n = decode_notice(encode_notice("store", "w", tokens=tokens, cache_salt=salt))
    assert n.tokens is not None and n.tokens.tolist() == tokens and n.cache_salt == salt


_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_values = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, "1", None]),
        "op": st.sampled_from(["store", "evict", "clear", "drop", 3]),
        "worker": st.sampled_from(["w", "", "a b", "x" * 300, 5]),
        "keys": _values | st.lists(u64, max_size=3),
        "tokens": _values | st.lists(u32, max_size=3),
        "from_block": _values,
        "lora_name": _values,
        "cache_salt": _values,
        "ts": _values,
    },
)


@settings(max_examples=300)
@given(payload=st.binary(max_size=64) | _fields.map(msgpack.packb) | _values.map(msgpack.packb))
def test_hostile_input_raises_only_typed_errors(payload: bytes) -> None:
    try:
        n = decode_notice(payload)
    except NoticeDecodeError as exc:
        assert exc.kind in NOTICE_ERROR_KINDS
        return
    assert n.op in ("store", "evict", "clear")
    assert n.op == "clear" or (n.keys is None) != (n.tokens is None)


def test_specific_refusals() -> None:
    cases = {
        b"\xc1": "msgpack",
        msgpack.packb([1, 2]): "type",
        msgpack.packb({"op": "store"}): "shape",
        msgpack.packb({"v": 2, "op": "clear", "worker": "w"}): "version",
        msgpack.packb({"v": 1, "op": "store", "worker": "w"}): "shape",
        msgpack.packb({"v": 1, "op": "store", "worker": "w", "keys": [-1]}): "value",
        msgpack.packb({"v": 1, "op": "store", "worker": "w", "tokens": [2**33]}): "value",
        msgpack.packb({"v": 1, "op": "clear", "worker": "a|b"}): "value",
    }
    for payload, kind in cases.items():
        with pytest.raises(NoticeDecodeError) as err:
            decode_notice(payload)
        assert err.value.kind == kind, payload


@pytest.fixture
async def listener(redis_url: str, redis_client: Any) -> AsyncIterator[Listener]:
    s = ListenerSettings(
        model=M, redis_url=redis_url, block_size=B, metrics_port=0, metrics_host="127.0.0.1"
    )
    lst = Listener(s)
    await lst.start()
    await lst.wait_ticked()
    yield lst
    await lst.close()


async def _until(check: Any) -> None:
    deadline = time.monotonic() + 15
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.redis
async def test_notices_reach_the_index(listener: Listener, redis_client: Any) -> None:
    tokens = list(range(5 * B + 3))
    keys = BlockHasher(M, B).keys(tokens)
    idx = ResidencyIndex(redis_client)

    async def depth() -> int:
        return (await idx.lookup(M, keys)).depth("side-1")

    # Subscription may lag the start: publish until someone hears it.
    async def heard() -> bool:
        n = await publish_notice(redis_client, M, "store", "side-1", tokens=tokens)
        return n > 0 and await depth() == 5

    await _until(heard)
    await publish_notice(redis_client, M, "evict", "side-1", tokens=tokens, from_block=3)

    async def evicted() -> bool:
        return await depth() == 3

    await _until(evicted)
    await publish_notice(redis_client, M, "store", "side-1", keys=keys)
    await _until(lambda: _eq(depth(), 5))
    await redis_client.publish(f"kvr:{{{M}}}:notices", b"\xc1garbage")
    await publish_notice(redis_client, M, "clear", "side-1")
    await _until(lambda: _eq(depth(), 0))
    assert listener.metrics.notice_errors["msgpack"] == 1
    assert listener.metrics.notices["clear"] == 1


async def _eq(value: Any, expected: int) -> bool:
    return await value == expected
